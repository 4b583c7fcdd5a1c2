"""Device diagnostic: a split prefill's step alone and beside a decode worker (torch-paged path)."""
import os
import sys
import time

import pandas as pd

from hwloop.interference import CoRun, measure_interference
from policies.specs import ModelSpec

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
out = os.environ.get("OUT", "/tmp")
if device == "cuda":
    spec = ModelSpec("l32-h4096-gqa8", 32, 4096, 32, 8, 14336, 32000, max_context=512)
    parts = {"mps": (70, 30), "none": (100, 100)}
else:
    spec = ModelSpec("tiny-l4-h512", 4, 512, 8, 8, 1376, 1024, max_context=512)
    parts = {"cores": (50, 50)}
frames = []
for partition, (p, d) in parts.items():
    runs = [CoRun(p, d, (16, 64), (32, 128)), CoRun(p, d, (1, 64), (32, 128)), CoRun(p, d, (16, 64), (1, 128))]
    t = time.time()
    df = measure_interference(spec, runs, device=device, partition=partition if device == "cuda" else "mps",
                              backend="torch-paged", window_s=1.0, repeats=5, max_steps=64)
    df["partition"] = partition
    frames.append(df)
    print(partition, f"{time.time() - t:.0f} s", flush=True)
    print(df[["phase", "own_pct", "other_pct", "batch", "seq_len", "other_batch", "other_seq_len", "alone_ms",
              "together_ms", "slowdown", "n_together"]].round(2).to_string(index=False), flush=True)
pd.concat(frames).to_csv(f"{out}/interference_paged.csv", index=False)
