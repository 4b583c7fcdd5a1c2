"""`run_system` on real vLLM engines: the hardware counterpart of `experiments.systems.run_system`.

It is what `runner=hwloop` dispatches to (conf/runner/hwloop.yaml), with the same signature and
the same `SystemRun`, so `experiments.run` reports a hardware run like a simulated one:

    python -m experiments.run runner=hwloop sim.mode=mixed cluster=... models=... cost=profile cost.path=...

`mode="mixed"` runs stock vLLM engines, one per LLM (`hwloop.runner`); `mode="split"` runs
MuxServe's own execution, a prefill and a decode process per LLM on the torch engine sharing one KV
pool per unit (`hwloop.split_runner`). `skip_steps`
maps to the runner's decode runs, its exact counterpart. The engines run on this machine's CPU
cores, or with `device="cuda"` (split mode) on its GPUs as MPS clients; a mixed-mode placement whose
engines would not fit in its memory (the preset models are 7B and up,
with KV caches sized from the cluster config) is refused in one line before any engine starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.config import ConfigError
from experiments.systems import (
    SYSTEMS,
    SystemRun,
    baseline_latency,
    place,
    sorted_records,
    type_specs,
)
from hwloop.engine import engine_config
from hwloop.partition import Device, MPSDaemon
from hwloop.runner import Runner, RunnerConfig, RunnerError
from hwloop.split_runner import SplitRunner
from policies.batching import make_batching
from policies.cost import CostModel
from policies.metrics import summarize
from policies.placement import Placement, blocks_per_chunk
from policies.specs import ClusterSpec, GiB, ModelSpec
from policies.view import ExecutionMode
from traces.schema import Workload


def run_system(system: str, workload: Workload, cluster: ClusterSpec, cost: CostModel, *,
               placement_opts: dict[str, Any] | None = None, batching_opts: dict[str, Any] | None = None,
               mode: ExecutionMode = "mixed", skip_steps: bool = True, horizon_s: float | None = None,
               records_path: str | Path | None = None, extra_specs: dict[str, ModelSpec] | None = None,
               progress: Callable[[float], None] | None = None, placement: Placement | None = None,
               batching: str | None = None, device: Device = "cpu",
               gpu_cores: dict[int, tuple[int, ...]] | None = None, mps: MPSDaemon | None = None,
               work_dir: str | Path | None = None, log_jobs: bool = False) -> SystemRun:
    """Place (unless given), replay on real engines, summarise; the cost model only places and sets SLOs.

    `gpu_cores` (CPU): the cores standing for each GPU index; None splits this process's cores.
    `mps` (CUDA): a running MPS daemon the workers become clients of (None: the run starts its own).
    `log_jobs`: keep a row per job in `SystemRun.jobs`.
    """
    if mode not in ("mixed", "split"):
        raise ConfigError(f"runner=hwloop: sim.mode must be mixed (vLLM engines) or split (torch engines over "
                          f"a shared KV pool), got {mode!r}")
    t0 = time.perf_counter()
    if placement is None:
        placement = place(system, workload, cluster, cost, placement_opts=placement_opts, extra_specs=extra_specs)
    t_place = time.perf_counter() - t0
    policy = make_batching(batching or SYSTEMS[system][1], **(batching_opts or {}))
    specs = type_specs(workload, extra_specs)
    if mode == "mixed":
        check_memory(placement, specs, policy.max_prefill_tokens)
    config = RunnerConfig(records_path=records_path, work_dir=work_dir, device=device, gpu_cores=gpu_cores, mps=mps,
                          horizon_s=horizon_s, progress=progress, decode_runs=skip_steps,
                          log_jobs=log_jobs)
    try:  # the split runner checks its pool and shares itself, before any process starts
        runner = (SplitRunner if mode == "split" else Runner)(workload, placement, policy, specs, config)
    except RunnerError as e:  # a placement this hardware cannot run: a config problem, said in one line
        raise ConfigError(f"runner=hwloop: {e}") from None
    result = runner.run()
    records = sorted_records(result)
    summary = summarize(records, baseline_latency(records, workload, cluster, cost, extra_specs),
                        rates=workload.rates())
    stats = {**result.stats, "placement_s": t_place, "estimated_throughput_rps": placement.estimated_throughput}
    return SystemRun(system, placement, summary, records, stats, result.jobs)


def check_memory(placement: Placement, specs: dict[str, ModelSpec], prefill_tokens: int) -> None:
    """Refuse, in one line, engines whose weights and KV caches exceed this machine's free memory.

    vLLM would fail inside a worker after a minute of start-up, with a message about its own
    settings; this names the models and the numbers instead. Sizes are the runner's own.
    """
    import psutil  # a vLLM dependency: present wherever engines can run

    need, names = 0, []
    for unit in placement.units:
        for x in unit.llms:
            spec = specs[x.model]
            cfg = engine_config(spec, "", max_batch=x.max_batch, pool_blocks=unit.kv_blocks,
                                chunk_blocks=blocks_per_chunk(spec), prefill_tokens=prefill_tokens)
            need += spec.weight_bytes + cfg.kv_cache_bytes
            names.append(f"{x.name} ({spec.name})")
    have = psutil.virtual_memory().available
    if need > have:
        raise ConfigError(f"runner=hwloop: the engines of {', '.join(names)} need {need / GiB:.1f} GiB for weights "
                          f"and KV caches, this machine has {have / GiB:.1f} GiB available (smaller models, or "
                          "experiments.validate for tiny ones)")
