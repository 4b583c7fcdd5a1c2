"""The hardware runner: replays a Workload in wall-clock time on real vLLM engines.

It executes the same `Placement` and `BatchingPolicy` objects as the simulator and writes the same
request records (`policies.records`), so a run here and a simulation can be compared row for row.

Execution semantics ("mixed" mode, the only one a stock vLLM engine can run):
- One worker process per placed LLM, pinned to a slice of its unit (`hwloop.partition`) at the
  share it will be launched with, fixed for the whole run (`worker_share_pct`).
- The wall-clock replay, the unit ledgers (`policies.ledger.UnitLedger`, the simulator's own
  bookkeeping), core sharing, result checks and crash safety are `hwloop.replay.ReplayRunner`'s,
  shared with the split runner; this module keeps what a vLLM engine per LLM adds. The policy
  sees the ledger through a `UnitView` and is asked to decide after every change: an arrival, a
  step's end, a quota tick (`policy.quotas` at start and every `quota_period_s`).
- A `Launch(phase="mixed", request_ids=new admissions + running requests)` means: add the newly
  admitted requests to that LLM's engine and run exactly one engine step. That step prefills the
  new requests (each gets its first token) and decodes every running one (one token each). Since a
  vLLM step always decodes every request in its engine, a launch must name all of the LLM's
  running requests; `preempt` aborts requests in the engine, which later come back with their
  whole context as the prompt (recompute), as in the simulator.
- Token times are the end of the engine step that produced them, read in the worker.
- Decode runs (`decode_runs`, the counterpart of the simulator's step skipping): when a launch is
  a pure decode and no other engine on the unit is busy or could start anything, the policy would
  relaunch the same step after each one, so the worker repeats it without a round trip, up to the
  first request's finish and as far as the KV slack allows. A change on the unit (an arrival, a
  quota tick) asks the run to stop after its current step, and the unit's next decision waits for
  that step boundary, so the KV accounting is exact at every decision. The one difference from
  step-by-step execution: an arrival for another, idle LLM of the unit is launched at the run's
  next step boundary instead of at once (at most one decode step later).
- CPU: workers whose core sets overlap never step at the same time; a launch whose cores are busy
  waits for them (counted in `stats["deferred_launches"]`). The policy sees it as running.
- Requests that cannot be served (longer than the engine's `max_model_len`, or needing more KV
  blocks than the unit's pool) fail on arrival with a reason; nothing is dropped.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from hwloop.engine import EngineConfig, engine_config, write_model_dir
from hwloop.partition import MPSDaemon, Slice, cpu_slices, cuda_slices
from hwloop.replay import (
    Job,
    Proc,
    ReplayRunner,
    RunnerConfig,
    RunnerError,
    RunnerUnit,
    RunResult,
)
from hwloop.worker import Admit, StepCmd, StepDone, WorkerHandle, WorkerSpec
from policies.ledger import UnitLedger
from policies.placement import LLMPlacement, Placement, Unit, blocks_per_chunk
from policies.specs import ModelSpec
from policies.view import BatchingPolicy, Launch, Request
from traces.schema import Workload


class Runner(ReplayRunner):
    """Mixed mode: one vLLM engine worker per placed LLM, one engine step per launch."""

    mode = "mixed"
    decide_beside_runs = False

    # ---- set-up ---------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        super()._check_inputs()
        if self.config.device == "cpu" and any(x.tp > 1 for u in self.placement.units for x in u.llms):
            raise RunnerError("tensor parallelism > 1 is not supported by the CPU runner (one process per LLM)")

    def _slices(self, unit: Unit, daemon: MPSDaemon | None) -> list[Slice]:
        """Each LLM's worker slice: its cores, or on CUDA its MPS share of `daemon` (None: whole GPUs)."""
        if self.config.device == "cpu":
            return cpu_slices(unit.llms, self.policy.exclusive, self._unit_cores(unit))
        return cuda_slices(unit.llms, self.policy.exclusive, unit.gpus, daemon)

    def _build(self, work: Path) -> None:
        daemon = self._mps_daemon(work)
        per_gpu: dict[int, int] = {}
        for u in self.placement.units:
            for g in u.gpus:
                per_gpu[g] = per_gpu.get(g, 0) + len(u.llms)
        chunks = {m: blocks_per_chunk(spec) for m, spec in self.specs.items()}
        for unit in self.placement.units:
            for x, sl in zip(unit.llms, self._slices(unit, daemon), strict=True):
                real = self.config.model_dirs.get(x.model)
                cfg = placed_engine(x, unit, self.specs[x.model], self.policy.max_prefill_tokens, work / "models", real,
                                    self.config.max_model_len)
                if self.config.device == "cuda":
                    share = self.config.cuda_memory_fraction or 0.9 / max(per_gpu[g] for g in unit.gpus)
                    cfg = replace(cfg, gpu_memory_utilization=share)
                handle = WorkerHandle(WorkerSpec(x.name, cfg, sl.cores, sl.env), work / "logs" / f"{x.name}.log",
                                      unit=unit.unit_id)
                self._procs[x.name, "mixed"] = Proc(x.name, "mixed", unit.unit_id, sl, handle)
            ledger = UnitLedger(unit, self.specs, chunks, "mixed", self.policy.exclusive, self.writer, jobs=self.jobs)
            self.units[unit.unit_id] = RunnerUnit(ledger)

    def _context_limit(self, unit: RunnerUnit, r: Request) -> int:
        return self._procs[r.llm, "mixed"].worker.spec.engine.max_model_len  # the engine's limit, not the model's

    # ---- launches and results -------------------------------------------------------------------
    def _start(self, unit: RunnerUnit, launch: Launch) -> Job:
        """Check a launch against the engine's rules, then apply it to the unit's ledger (which
        checks it against the unit's budgets)."""
        name = self.policy.name
        proc = self._procs[launch.llm, "mixed"] if launch.llm in unit.ledger.llms else None
        if proc is not None and launch.phase != "mixed":  # else the ledger says the LLM is not on this unit
            raise RunnerError(f"policy {name} launched a {launch.phase!r} job; stock vLLM engines only run "
                              f"'mixed' steps (give the policy view mode 'mixed')")
        self._check_share(launch, proc)
        batch = self._apply(unit, launch)
        assert proc is not None  # the ledger knows every LLM of the unit
        llm = batch.llm
        if batch.decoding != len(llm.running):
            left = sorted({r.request_id for r in llm.running} - set(launch.request_ids))[:5]
            raise RunnerError(f"policy {name} left running request(s) {left} of {llm.name} out of a step; "
                              f"a vLLM step decodes every request in its engine")
        admitted = batch.requests[: batch.admitted]
        cmd = StepCmd(tuple(Admit(r.request_id, r.prompt_tokens, r.context_tokens, r.remaining_tokens)
                            for r in admitted), tuple(launch.preempt))
        job = Job(proc, batch, cmd)
        proc.job = job
        return job

    def _may_repeat(self, unit: RunnerUnit, job: Job) -> bool:
        """A pure decode (no admission, no preemption) that is all the unit has to do
        (`UnitLedger.idle_work`)."""
        if job.batch.admitted or job.cmd.preempt:
            return False
        return len(unit.ledger.batches) == 1 and not unit.ledger.idle_work()

    def _extend(self, unit: RunnerUnit, job: Job, steps: int) -> None:
        job.cmd = replace(job.cmd, max_steps=steps)

    def _shorten(self, unit: RunnerUnit, job: Job) -> None:
        job.cmd = replace(job.cmd, max_steps=1)

    def _check(self, job: Job, reply: StepDone) -> None:
        """The worker's own findings (vLLM reordering behind its back) and the runner's."""
        self._deviations(job, reply.steps, reply.tokens, reply.finished, list(reply.anomalies))

    def _end(self, unit: RunnerUnit, job: Job, reply: StepDone) -> None:
        """The blocks of a run's later steps are charged now that it ran them."""
        steps = reply.steps
        self.stats["decode_runs"] += steps > 1
        unit.ledger.hold_for_steps(job.batch, steps)
        unit.ledger.end(job.batch, steps, reply.t_first_end - self._t0, reply.t_end - self._t0, job.t_sent - self._t0)


def placed_engine(x: LLMPlacement, unit: Unit, spec: ModelSpec, prefill_tokens: int, models: Path,
                  real: str | Path | None = None, max_model_len: int | None = None) -> EngineConfig:
    """The vLLM engine a placed LLM's worker runs: its batch limit, the unit's KV pool, the batching
    policy's token budget (`prefill_tokens`); the model's weights from `real`, or random ones written
    under `models`. A replay of a run's jobs (`experiments.job_replay`) builds its workers with this too."""
    folder = real or write_model_dir(spec, models)
    return engine_config(spec, folder, max_batch=x.max_batch, pool_blocks=unit.kv_blocks,
                         chunk_blocks=blocks_per_chunk(spec), prefill_tokens=prefill_tokens,
                         dummy=real is None, max_model_len=max_model_len)


def run(workload: Workload, placement: Placement, policy: BatchingPolicy, specs: dict[str, ModelSpec],
        **config: Any) -> RunResult:
    """Replay `workload` on real engines; keyword arguments are `RunnerConfig` fields."""
    return Runner(workload, placement, policy, specs, RunnerConfig(**config)).run()
