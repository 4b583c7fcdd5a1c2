"""The split workers' paged steps on batches of mixed lengths, against uniform batches at their mean.

    python -m hwloop.bench_paged                  # one core, tiny-l4-h512 (the validation's first model)
    python -m hwloop.bench_paged --repeats 15 --json out.json

The simulator charges a step by its batch and the batch's *mean* length (prompt for a prefill,
context for a decode), read from a profile of uniform batches. A served trace mixes lengths, so a
step kernel that pads every row to the longest would cost more than the profile says, by as much
as the longest row exceeds the mean, and no profile cell could show it. This times
`TorchEngine.prefill_paged` and `decode_paged` on lognormal lengths (the validation's trace
shape: sigma 0.6) and on a uniform batch of the same batch size at their rounded mean, in the same
process, alternating the two each repeat; a ratio near 1 means the step costs what the simulator
charges.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hwloop.torch_engine import TorchEngine
from policies.placement import BLOCK_BYTES, blocks_for_tokens
from policies.specs import ModelSpec

MODEL = ModelSpec("tiny-l4-h512", 4, 512, 8, 8, 1376, 1024, max_context=512)


def lengths(batch: int, mean: int, rng: np.random.Generator, longest: int) -> list[int]:
    """Lognormal lengths with this mean before clipping (sigma 0.6), clipped to 8..`longest`."""
    sigma = 0.6
    return [int(x) for x in np.clip(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, batch), 8, longest)]


def paged_tables(engine: TorchEngine, tokens: Sequence[int]) -> tuple[torch.Tensor, list[list[int]]]:
    """A pool of exactly these rows' blocks, handed out shuffled, and each row's block table."""
    per_row = [blocks_for_tokens(n, engine.layout(BLOCK_BYTES).chunk_blocks) for n in tokens]
    pool = torch.zeros(sum(per_row), BLOCK_BYTES, dtype=torch.uint8)
    ids = torch.randperm(sum(per_row)).tolist()
    starts = np.cumsum([0, *per_row])
    return pool, [ids[a:b] for a, b in itertools.pairwise(starts)]


def prefill_step(engine: TorchEngine, prompt_lengths: Sequence[int]) -> Callable[[], object]:
    pool, tables = paged_tables(engine, prompt_lengths)
    prompts = [[3 + (i * 7 + j) % 1000 for j in range(n)] for i, n in enumerate(prompt_lengths)]
    return lambda: engine.prefill_paged(pool, tables, prompts).argmax(-1).tolist()


def decode_step(engine: TorchEngine, held: Sequence[int]) -> Callable[[], object]:
    pool, tables = paged_tables(engine, [n + 1 for n in held])
    engine.pool_view(pool).normal_()
    last = torch.full((len(held),), 3)
    return lambda: engine.decode_paged(pool, tables, held, last).argmax(-1).tolist()


def time_pair(mixed: Callable[[], object], uniform: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of each, timed alternately (a drift of the machine hits both alike); 2 warm-ups."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats + 2):
        for i, step in enumerate((mixed, uniform)):
            t0 = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0][2:]), statistics.median(times[1][2:])


def bench(engine: TorchEngine, repeats: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for phase, batches, mean, make in (("prefill", (4, 8, 16), 96, prefill_step),
                                       ("decode", (4, 16, 32, 64), 160, decode_step)):
        for batch in batches:
            mixed = lengths(batch, mean, rng, engine.max_len - 1)
            at_mean = round(sum(mixed) / batch)
            t_mixed, t_uniform = time_pair(make(engine, mixed), make(engine, [at_mean] * batch), repeats)
            rows.append({"phase": phase, "batch": batch, "mean": at_mean, "longest": max(mixed),
                         "mixed_ms": 1e3 * t_mixed, "uniform_ms": 1e3 * t_uniform, "ratio": t_mixed / t_uniform})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="timed steps of each batch (after 2 warm-ups)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the split workers run one per core)")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = bench(TorchEngine(MODEL, max_len=MODEL.max_context), args.repeats)
    print(f"torch {torch.__version__}, {args.threads} thread(s), pid {os.getpid()}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(table.to_dict(orient="records"), indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
