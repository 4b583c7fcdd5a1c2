"""A/B: the same profile cells timed on (a) the profiler's worker (profile config, no warm_shapes),
(b) a served-config worker without warm_shapes, (c) a served-config worker after warm_shapes.
One core (core 0), workers one at a time, rounds alternate the variants."""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hwloop.engine import engine_config, write_model_dir
from hwloop.partition import cpu_env
from hwloop.profiler import Grid, profile_engine_config
from hwloop.worker import ProfileCmd, WorkerHandle, WorkerSpec
from policies.placement import blocks_per_chunk
from policies.specs import ModelSpec

spec = ModelSpec("tiny-l4-h512", 4, 512, 8, 8, 1376, 1024, max_context=512)
CELLS = [("prefill", 1, 64), ("prefill", 1, 128), ("prefill", 1, 256), ("prefill", 4, 64),
         ("decode", 1, 128), ("decode", 16, 128)]
core = int(sys.argv[1]) if len(sys.argv) > 1 else 0
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
work = Path(tempfile.mkdtemp(prefix="warm-ab-"))
folder = write_model_dir(spec, work / "models")
grid = Grid(batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), seq_lens=(8, 32, 64, 128, 256, 448), sm_pcts=(50, 100),
            warmup=2, repeats=5, max_prefill_tokens=4096)
profile_cfg = profile_engine_config(spec, folder, grid)
served_cfg = engine_config(spec, folder, max_batch=256, pool_blocks=65536, chunk_blocks=blocks_per_chunk(spec),
                           prefill_tokens=2048)
variants = {"profile": (profile_cfg, False), "served": (served_cfg, False), "served+warm": (served_cfg, True)}
results: dict[str, list[dict]] = {k: [] for k in variants}
for r in range(rounds):
    order = list(variants) if r % 2 == 0 else list(reversed(variants))
    for name in order:
        cfg, warm = variants[name]
        h = WorkerHandle(WorkerSpec(f"ab-{name}", cfg, (core,), cpu_env((core,)), "vllm", "cpu", warm_shapes=warm),
                         work / "logs" / f"{name}-{r}.log")
        t = time.time()
        h.start()
        h.wait_ready(600)
        ready_s = time.time() - t
        row = {"ready_s": ready_s}
        for phase, b, s in CELLS:
            h.send(ProfileCmd(phase, b, s, warmup=2, repeats=9))
            done = h.recv(600)
            row[f"{phase} {b}x{s}"] = 1e3 * float(np.median(done.samples_s))
        h.stop()
        results[name].append(row)
        print(r, name, json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
print("medians over rounds (ms):")
for name, rows in results.items():
    print(name, {k: round(float(np.median([x[k] for x in rows])), 2) for k in rows[0]})
