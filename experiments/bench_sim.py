"""Simulator speed: simulated requests per wall second, with and without skipping decode steps.

    python -m experiments.bench_sim [--table PATH] [--duration S] [--azure PATH]

Two cases from the issue: MuxServe's 19-LLM / 32-GPU synthetic workload (α=0.7, top rate 40 req/s)
under muxserve+ADBS, and one llama-7b on one A100 replaying the Azure conversation trace. Each runs
with step skipping and step by step in the same process, so the ratio is robust to a noisy machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.systems import run_system
from policies.cost import TableCostModel
from policies.specs import ClusterSpec
from traces.loaders import load_azure
from traces.spec import muxserve_synthetic
from traces.synthetic import generate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(system: str, workload, cluster: ClusterSpec, cost, skip: bool) -> tuple[float, dict]:
    t0 = time.perf_counter()
    run = run_system(system, workload, cluster, cost, skip_steps=skip)
    return time.perf_counter() - t0, run.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(SHARED / "muxserve_llama_a100.json"))
    ap.add_argument("--azure", default=str(SHARED / "azure_llm_2023_conv.csv"))
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of synthetic trace")
    ap.add_argument("--azure-requests", type=int, default=5000)
    args = ap.parse_args()
    cost = TableCostModel.from_muxserve_json(args.table)
    cases = [("19 LLMs / 32 A100, α=0.7, muxserve+adbs", "muxserve",
              generate(muxserve_synthetic(0.7, 1.0), args.duration, seed=0), ClusterSpec(4, 8))]
    if Path(args.azure).exists():
        azure = load_azure(args.azure, model="llama-7b")
        azure = azure.with_frame(azure.df.head(args.azure_requests))
        cases.append((f"1× llama-7b / 1 A100, Azure conv (first {len(azure)} requests), spatial+fcfs",
                      "spatial", azure, ClusterSpec(1, 1)))
    for label, system, workload, cluster in cases:
        fast_s, stats = timed(system, workload, cluster, cost, skip=True)
        slow_s, _ = timed(system, workload, cluster, cost, skip=False)
        n = len(workload)
        print(f"{label}: {n} requests, {stats['sim_time_s']:.0f} s simulated")
        print(f"  skipping steps : {fast_s:7.2f} s wall  {n / fast_s:8.0f} req/s")
        print(f"  step by step   : {slow_s:7.2f} s wall  {n / slow_s:8.0f} req/s")
        print(f"  speed-up       : {slow_s / fast_s:.2f}×   decisions {stats['decisions']}, decode steps {stats['decode_steps']}")


if __name__ == "__main__":
    main()
