"""A split prefill worker's prefills of new prompt mixes, with and without its warm-up.

    python -m hwloop.bench_warm                 # 2 rounds, 60 mixes each, one core, tiny-l4-h512
    python -m hwloop.bench_warm --rounds 3 --mixes 100

A served trace gives nearly every prefill a token count the worker never ran, and the CPU kernels of
a matrix product are built per row count (`hwloop.split_worker.PhaseServer.warm_shapes`). This
builds a prefill server (`PhaseServer`, in a process of its own, since the built kernels are the
process's) with the warm-up off and then on, alternating, and in each times random mixes of 1-4
prompts of 8-480 tokens, each mix twice in a row: `first / again` is what a new mix costs over one
the worker just ran (near 1: nothing left to build; the rest is the caches the first run filled).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from hwloop.engine import KERNEL_CACHE_ENV
from hwloop.kv_pool import BlockAllocator, KVPool
from policies.placement import blocks_for_tokens, blocks_per_chunk
from policies.specs import ModelSpec

MODEL = ModelSpec("tiny-l4-h512", 4, 512, 8, 8, 1376, 1024, max_context=512)
BUDGET = 2048  # the validation's max_prefill_tokens
MAX_BATCH = 64


def one_round(warm: bool, mixes: int, seed: int) -> dict[str, float]:
    """In this process: a prefill server, warmed up or not, timing `mixes` new mixes twice each."""
    from hwloop.split_worker import PhaseServer, PrefillCmd, PrefillItem, SplitWorkerSpec

    pool = KVPool(blocks_for_tokens(4 * MODEL.max_context, blocks_per_chunk(MODEL)))
    blocks = BlockAllocator(pool.num_blocks)
    spec = SplitWorkerSpec("bench/prefill", "bench", "prefill", MODEL, pool.handle(),
                           max_prefill_tokens=BUDGET if warm else 0, max_batch=MAX_BATCH if warm else 0)
    server = PhaseServer(spec)

    def prefill(lengths: list[int], first_id: int) -> float:
        items = tuple(PrefillItem(first_id + i, tuple(3 + (first_id + i * 13 + j) % 1000 for j in range(n)),
                                  tuple(blocks.allocate(blocks_for_tokens(n, blocks_per_chunk(MODEL)))))
                      for i, n in enumerate(lengths))
        done = server.prefill(PrefillCmd(items))
        for it in items:
            blocks.deallocate(it.blocks)
        return done.t_end - done.t_start

    rng = np.random.default_rng(seed)
    first, again = [], []
    for k in range(mixes):
        lengths = [int(x) for x in rng.integers(8, 480, int(rng.integers(1, 5)))]
        first.append(prefill(lengths, 1000 * k))
        again.append(prefill(lengths, 1000 * k + 500))
    pool.close()
    return {"warm_up_s": server.warm_s, "first_ms": 1e3 * float(np.median(first)),
            "again_ms": 1e3 * float(np.median(again)), "first_over_again": float(np.median(np.divide(first, again)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds, each one process without the warm-up, one with")
    ap.add_argument("--mixes", type=int, default=60, help="prompt mixes timed per process (the same in each)")
    ap.add_argument("--one", choices=["cold", "warm"], help=argparse.SUPPRESS)  # a child process's round
    args = ap.parse_args()
    if args.one:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        print(json.dumps(one_round(args.one == "warm", args.mixes, seed=0)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", **KERNEL_CACHE_ENV}
    print("round  warm-up  warm-up s  first ms  again ms  first/again (median per mix)")
    for r in range(args.rounds):
        for mode in ("cold", "warm"):
            done = subprocess.run([sys.executable, "-m", "hwloop.bench_warm", "--one", mode, "--mixes", str(args.mixes)],
                                  capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                sys.exit(f"bench_warm: the {mode} round failed: {done.stderr.strip().splitlines()[-1:]}")
            x = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{r:5d}  {'on' if mode == 'warm' else 'off':7s}  {x['warm_up_s']:9.2f}  {x['first_ms']:8.2f}  "
                  f"{x['again_ms']:8.2f}  {x['first_over_again']:.3f}")


if __name__ == "__main__":
    main()
