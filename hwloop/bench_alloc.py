"""The split workers' paged decode under glibc's default allocator and under the workers' settings.

    python -m hwloop.bench_alloc                  # one core, tiny-l4-h512, 40 steps per process, 2 rounds
    python -m hwloop.bench_alloc --steps 60 --rounds 3 --core 1

Every worker runs with `hwloop.partition.ALLOCATOR_ENV` (freed memory stays in the process). This
shows why: a served trace changes a decode's batch and contexts at every step, as
`policies`' batching does, and by default glibc maps each tensor above its threshold (which moves
with what was freed before) afresh, so the step pays a page fault per 4 KiB it touches, and pays
more of them the more varied the shapes before it. Each setting runs in its own process (glibc
reads the settings when a process starts) on the same core, the two alternated each round; each
process times `--steps` decode steps of random batches (1–120) and lognormal contexts (mean 160,
the validation's trace shape), every step a new shape after another, with the step's minor page
faults (`getrusage`). Reported per batch range: median step time and mean faults per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch

from hwloop.bench_paged import MODEL, decode_step, lengths
from hwloop.partition import ALLOCATOR_ENV
from hwloop.torch_engine import TorchEngine

BATCH_RANGES = ((1, 16), (16, 48), (48, 121))


def child(steps: int, seed: int) -> list[dict[str, float]]:
    """In this process, as it was started: `steps` decode steps of new shapes, each timed with its faults."""
    torch.set_num_threads(1)
    engine = TorchEngine(MODEL, max_len=MODEL.max_context)
    rng = np.random.default_rng(seed)
    decode_step(engine, [64] * 8)()  # warm
    rows = []
    for _ in range(steps):
        batch = int(rng.integers(1, 121))
        step = decode_step(engine, lengths(batch, 160, rng, engine.max_len - 2))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        rows.append({"batch": batch, "ms": 1e3 * (time.perf_counter() - t0),
                     "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})
    return rows


def run_child(allocator: str, steps: int, seed: int, core: int) -> pd.DataFrame:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if allocator == "workers":
        env.update(ALLOCATOR_ENV)
    out = subprocess.run(["taskset", "-c", str(core), sys.executable, "-m", "hwloop.bench_alloc", "--child",
                          "--steps", str(steps), "--seed", str(seed)], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True)
    return pd.DataFrame(json.loads(out.stdout.splitlines()[-1])).assign(allocator=allocator)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="decode steps per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per setting, the settings alternated")
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.seed)))
        return
    runs = [run_child(a, args.steps, args.seed + r, args.core) for r in range(args.rounds) for a in ("default", "workers")]
    steps = pd.concat(runs)
    steps["batches"] = pd.cut(steps.batch, [lo for lo, _ in BATCH_RANGES] + [BATCH_RANGES[-1][1]], right=False)
    table = steps.groupby(["batches", "allocator"], observed=True).agg(steps=("ms", "size"), step_ms=("ms", "median"),
                                                                       faults=("faults", "mean")).unstack("allocator")
    table[("step_ms", "default ÷ workers")] = table["step_ms"]["default"] / table["step_ms"]["workers"]
    print(f"torch {torch.__version__}, core {args.core}, {args.rounds} round(s) of {args.steps} steps; "
          f"workers = {' '.join(f'{k}={v}' for k, v in ALLOCATOR_ENV.items())}")
    print(table.to_string(float_format=lambda x: f"{x:.2f}"))


if __name__ == "__main__":
    main()
