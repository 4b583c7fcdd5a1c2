"""A "system" is a placement policy paired with a batching policy, as the paper compares them.

- muxserve: the enumeration-based greedy placement with ADBS (prefill/decode SM multiplexing);
- spatial: dedicated GPUs per LLM, one job at a time (a vLLM per LLM);
- temporal: muxserve's colocation, one job at a time per mesh, FCFS across LLMs;
- search: the placement search beyond the paper, with ADBS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from policies.batching import make_batching
from policies.cost import CostModel, InterferenceModel, RunnerTerms
from policies.metrics import Summary, standalone_latency, summarize
from policies.placement import Placement
from policies.placement_algos import Estimator, PlacerOptions, demands_from_workload, make_placement
from policies.placement_algos.greedy import check_feasible
from policies.placement_algos.spatial import mesh_size
from policies.records import read_records
from policies.specs import ClusterSpec, ModelSpec
from policies.view import ExecutionMode
from sim import Simulator
from traces.schema import Workload

SYSTEMS: dict[str, tuple[str, str]] = {
    "muxserve": ("muxserve", "adbs"),
    "spatial": ("spatial", "fcfs"),
    "temporal": ("temporal", "fcfs"),
    "search": ("search", "adbs"),
}


@dataclass
class SystemRun:
    system: str
    placement: Placement
    summary: Summary
    records: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)
    jobs: pd.DataFrame | None = None  # one row per job, with `log_jobs` (policies.ledger.JOB_COLUMNS)


def specs_of(workload: Workload, extra: dict[str, ModelSpec] | None = None) -> dict[str, ModelSpec]:
    """LLM name → ModelSpec, as placement reads it (the `model_type` column, or the LLM names)."""
    return {d.name: d.model for d in demands_from_workload(workload, extra)}


def baseline_latency(records: pd.DataFrame, workload: Workload, cluster: ClusterSpec,
                     cost: CostModel, extra: dict[str, ModelSpec] | None = None) -> Any:
    """Per-request standalone latency on the LLM's spatial-baseline GPUs at 100% SM (the SLO unit).

    Each LLM gets the mesh size the spatial placer would give it, whether or not every LLM's mesh
    fits the cluster at once: a request alone needs only its own (e.g. many LLMs on one CPU unit).
    """
    demands = demands_from_workload(workload, extra)
    est = Estimator(demands, cluster, cost, PlacerOptions())
    check_feasible(est)
    tp_of = {d.name: mesh_size(est, i) for i, d in enumerate(demands)}
    return standalone_latency(records, specs_of(workload, extra), tp_of, cost)


def check_baseline(workload: Workload, cluster: ClusterSpec, cost: CostModel,
                   extra: dict[str, ModelSpec] | None = None) -> None:
    """Raise PlacementError now if `baseline_latency` could not be computed after a run: every
    LLM's spatial-baseline mesh must hold its model."""
    check_feasible(Estimator(demands_from_workload(workload, extra), cluster, cost, PlacerOptions()))


def place(system: str, workload: Workload, cluster: ClusterSpec, cost: CostModel, *,
          placement_opts: dict[str, Any] | None = None,
          extra_specs: dict[str, ModelSpec] | None = None) -> Placement:
    """The placement of `system`'s placer for this workload (rates and lengths come from it)."""
    placer, _ = SYSTEMS[system]
    return make_placement(placer, demands_from_workload(workload, extra_specs), cluster, cost,
                          **(placement_opts or {}))


def type_specs(workload: Workload, extra_specs: dict[str, ModelSpec] | None = None) -> dict[str, ModelSpec]:
    """Model type → ModelSpec, as the executors look LLMs' models up."""
    return {s.name: s for s in specs_of(workload, extra_specs).values()}


def run_system(system: str, workload: Workload, cluster: ClusterSpec, cost: CostModel, *,
               placement_opts: dict[str, Any] | None = None, batching_opts: dict[str, Any] | None = None,
               mode: ExecutionMode = "split", skip_steps: bool = True, horizon_s: float | None = None,
               records_path: str | Path | None = None, extra_specs: dict[str, ModelSpec] | None = None,
               progress: Callable[[float], None] | None = None, placement: Placement | None = None,
               batching: str | None = None, core_slices: dict[str, tuple[int, ...]] | None = None,
               interference: InterferenceModel | None = None,
               runner_terms: RunnerTerms | None = None, log_jobs: bool = False) -> SystemRun:
    """Place, simulate and summarise one system on one workload; `batching` swaps its batcher (ablations).

    `core_slices`: the CPU cores each LLM's worker would be pinned to (hwloop.mirror), to model the
    CPU runner's turn-taking. `interference`: the slowdown of jobs sharing a unit's SMs.
    `runner_terms`: the CPU runner's measured extras per job (`policies.cost.RunnerTerms`).
    `log_jobs`: keep a row per job in `SystemRun.jobs`.
    """
    batcher = batching or SYSTEMS[system][1]
    t0 = time.perf_counter()
    if placement is None:
        placement = place(system, workload, cluster, cost, placement_opts=placement_opts, extra_specs=extra_specs)
    t_place = time.perf_counter() - t0
    sim = Simulator(workload, placement, make_batching(batcher, **(batching_opts or {})), cost,
                    type_specs(workload, extra_specs), mode=mode, skip_steps=skip_steps, horizon_s=horizon_s,
                    records_path=records_path, progress=progress, core_slices=core_slices,
                    interference=interference, runner_terms=runner_terms, log_jobs=log_jobs)
    t1, c1 = time.perf_counter(), time.process_time()
    result = sim.run()
    t_sim, c_sim = time.perf_counter() - t1, time.process_time() - c1
    records = sorted_records(result)
    summary = summarize(records, baseline_latency(records, workload, cluster, cost, extra_specs),
                        rates=workload.rates())
    stats = {**result.stats, "placement_s": t_place, "simulate_s": t_sim, "simulate_cpu_s": c_sim,
             "estimated_throughput_rps": placement.estimated_throughput}
    return SystemRun(system, placement, summary, records, stats, result.jobs)


def sorted_records(result: Any) -> pd.DataFrame:
    """An executor's records (returned, or streamed to Parquet), in request order."""
    records = result.records if result.records is not None else read_records(result.records_path)
    return records.sort_values("request_id", kind="stable").reset_index(drop=True)
