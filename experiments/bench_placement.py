"""Placement speed and the search's gain, on the paper's 19-LLM / 32-GPU synthetic set-up.

    python -m experiments.bench_placement --repeats 5

Each timed run gets a freshly loaded latency table (loading is not timed), so no latency lookup
is cached from an earlier run: the time is what a user placing once would wait.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time

from experiments.place import DEFAULT_TABLE, paper_demands
from policies.cost import TableCostModel
from policies.placement_algos import Estimator, PlacerOptions, make_placement
from policies.specs import ClusterSpec

ALPHAS = (0.7, 0.9, 1.3, 1.7, 2.1)
CLUSTER = ClusterSpec(4, 8)


def timed(policy: str, alpha: float, scale: float, table: str, **opts: object) -> tuple[float, float]:
    """Wall time of one placement from a cold cost model, and its estimated throughput."""
    cost = TableCostModel.from_muxserve_json(table)
    demands = paper_demands(alpha, scale)
    t0 = time.perf_counter()
    p = make_placement(policy, demands, CLUSTER, cost, **opts)
    return time.perf_counter() - t0, p.estimated_throughput


def bound(alpha: float, scale: float, table: str) -> float:
    """No placement scores more: every LLM alone on its best mesh size, at its candidate share."""
    est = Estimator(paper_demands(alpha, scale), CLUSTER, TableCostModel.from_muxserve_json(table), PlacerOptions())
    sizes = {1, 2, 4, 8}
    return math.fsum(est.upper_bound(i, sizes) for i in range(len(est.demands))) / est.total_rate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--cost", default=DEFAULT_TABLE)
    args = ap.parse_args(argv)
    logging.getLogger("policies.cost").setLevel(logging.ERROR)  # extrapolation notes, not results

    print(f"## 19 LLMs / 32 GPUs, α=0.7, scale {args.scale}: placement time (median of {args.repeats})\n")
    print("| placer | median s | min s | max s |\n|---|---|---|---|")
    for policy, opts in (("muxserve", {}), ("muxserve", {"prune": False}), ("search", {})):
        runs = [timed(policy, 0.7, args.scale, args.cost, **opts)[0] for _ in range(args.repeats)]
        label = policy + (" (unpruned)" if opts else "")
        print(f"| {label} | {statistics.median(runs):.3f} | {min(runs):.3f} | {max(runs):.3f} |")

    print(f"\n## Estimated throughput (req/s, rate-weighted), scale {args.scale}\n")
    print("| α | spatial | temporal | muxserve | search | bound | search gain | search s |\n|---|---|---|---|---|---|---|---|")
    for alpha in ALPHAS:
        est = {p: timed(p, alpha, args.scale, args.cost) for p in ("spatial", "temporal", "muxserve", "search")}
        gain = est["search"][1] / est["muxserve"][1] - 1
        print(f"| {alpha} | {est['spatial'][1]:.3f} | {est['temporal'][1]:.3f} | {est['muxserve'][1]:.3f} | "
              f"{est['search'][1]:.3f} | {bound(alpha, args.scale, args.cost):.3f} | {gain:+.2%} | {est['search'][0]:.2f} |")


if __name__ == "__main__":
    main()
