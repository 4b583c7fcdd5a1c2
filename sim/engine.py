"""The SimPy executor: runs a Workload through a Placement and a batching policy in simulated time.

Shape of the model (MuxServe §4):
- Each unit has `sm_units` compute units (10 × 10% SM plus an overload allowance) and one KV pool
  shared by its LLMs. Each LLM has a prefill process and a decode process ("split" mode), or one
  engine process ("mixed" mode, a stock vLLM step serving prefills and decodes together).
- A job holds its SM units and its requests' KV blocks for its duration, taken from the CostModel.
- The policy is asked what to launch after every change on a unit (an arrival, a job ending, a
  quota tick), once all changes at that instant have been applied.

Speed: a decode job may run several steps in one SimPy event. That is exact, not an approximation:
a run is only extended while no other process on the unit has anything it could start (so any
policy would relaunch the same decode at each step boundary), and it ends at the first step
boundary at or after the next thing that could change the unit (an arrival, another job's end, a
quota tick), or before its KV blocks would overflow. It ends when a request in it finishes, too,
unless no request waits anywhere on the unit: then only the batch could use what the finish frees,
so the run goes on with the batch shrunk, and the finished requests are recorded at their own step.
Step latencies are summed in the order SimPy would add them, so both modes give identical records
(tests/test_sim.py). Each job is one timeout event whose callback applies its end.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from policies.cost import CostModel, InterferenceModel, mixed_step_time
from policies.placement import BLOCK_TOKENS, Placement, Unit, blocks_for_tokens, blocks_per_chunk
from policies.records import RecordWriter
from policies.specs import ModelSpec
from policies.view import (
    BatchingPolicy,
    ExecutionMode,
    Launch,
    LLMView,
    ReadOnlyQueue,
    Request,
    UnitView,
    age,
    head_fits,
    hold,
    requeue_preempted,
    take_waiting,
)
from traces.schema import Workload

DECIDE_PRIORITY = 2  # after every NORMAL (=1) event at the same instant: decide on settled state


class SimulationError(RuntimeError):
    """A run that cannot be simulated as asked (unplaced LLM, a policy breaking a budget)."""


@dataclass(eq=False)
class LLMState:
    placement: Any  # LLMPlacement
    spec: ModelSpec
    chunk_blocks: int
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    prefill_busy: bool = False
    decode_busy: bool = False
    kv_used: int = 0
    kv_quota: int = 0
    prefill_idle_since: float = -1.0
    decode_idle_since: float = -1.0
    running_busy: int = 0  # how many of `running` are inside a job

    def view(self) -> LLMView:
        return LLMView(self.placement, self.chunk_blocks, ReadOnlyQueue(self.waiting),
                       ReadOnlyQueue(self.running), self.prefill_busy, self.decode_busy,
                       self.kv_used, self.kv_quota, self.prefill_idle_since, self.decode_idle_since)


@dataclass(eq=False)
class UnitState:
    unit: Unit
    llms: dict[str, LLMState]
    sm_free: int
    kv_free: int
    arrivals: np.ndarray  # arrival times of this unit's requests, sorted
    next_arrival: int = 0  # index into `arrivals` of the first not yet arrived
    next_tick: float = math.inf
    jobs: dict[int, Job] = field(default_factory=dict)  # running jobs by id
    decide_pending: bool = False


@dataclass
class SimResult:
    records: Any  # DataFrame, or None when streamed to `records_path`
    records_path: Path | None
    stats: dict[str, Any]


class Simulator:
    def __init__(self, workload: Workload, placement: Placement, policy: BatchingPolicy,
                 cost: CostModel, specs: dict[str, ModelSpec], *, mode: ExecutionMode = "split",
                 skip_steps: bool = True, horizon_s: float | None = None,
                 records_path: str | Path | None = None, records_flush_every: int = 65536,
                 progress: Callable[[float], None] | None = None,
                 core_slices: dict[str, tuple[int, ...]] | None = None,
                 interference: InterferenceModel | None = None) -> None:
        """`core_slices` (LLM name, or "<LLM>/prefill" and "<LLM>/decode" in split mode → the CPU
        cores its worker is pinned to) models the CPU runners'
        turn-taking: a launch whose cores overlap a running job's waits until that job ends, oldest
        first (hwloop.runner, deferred launches). None: SM shares only, nothing waits.

        `interference` slows jobs that share a unit's SMs (`_interfere`). None, or a model without
        coefficients: jobs beside each other run as if alone, MuxServe's own assumption."""
        self.workload, self.placement, self.policy, self.cost = workload, placement, policy, cost
        self.mode, self.skip_steps, self.horizon_s, self.progress = mode, skip_steps, horizon_s, progress
        self.env = simpy.Environment()
        self.writer = RecordWriter(records_path, records_flush_every)
        self.records_path = Path(records_path) if records_path else None
        self.stats: dict[str, Any] = {"decisions": 0, "jobs": 0, "decode_steps": 0, "preemptions": 0}
        self._job_ids = iter(range(1 << 62))
        self.units: dict[int, UnitState] = {}
        self.specs = specs
        self._check_models(workload, placement, specs)
        df = workload.df
        unit_of = placement.unit_of()
        for unit in placement.units:
            names = {x.name for x in unit.llms}
            llms = {x.name: LLMState(x, specs[x.model], blocks_per_chunk(specs[x.model])) for x in unit.llms}
            arrivals = df["arrival_s"].to_numpy()[df["model"].isin(names).to_numpy()]
            self.units[unit.unit_id] = UnitState(unit, llms, unit.sm_units, unit.kv_blocks, arrivals)
        self._unit_of = unit_of
        self.core_slices = core_slices
        self.interference = interference if interference is not None and interference.coef else None
        if self.interference is not None:
            if core_slices is not None:
                raise SimulationError("interference (GPU jobs sharing SMs) and core_slices (CPU workers taking "
                                      "turns on cores) model different hardware: pass one")
            self.stats["rescaled_jobs"] = 0
        self.stats["interference"] = self.interference.label if self.interference else "none"
        self._on_cores: dict[int, Job] = {}  # started jobs, by id, while core_slices is set
        self._held: deque[tuple[UnitState, Job, float]] = deque()  # launches waiting for cores, with durations
        if core_slices is not None:
            self.stats["deferred_launches"] = 0

    @staticmethod
    def _check_models(workload: Workload, placement: Placement, specs: dict[str, ModelSpec]) -> None:
        placed = placement.unit_of()
        missing = [m for m in workload.models if m not in placed]
        if missing:
            raise SimulationError(f"LLM(s) {', '.join(missing)} in the workload are placed on no unit "
                                  f"(placement '{placement.policy}' has {', '.join(placed) or 'none'})")
        unknown = sorted({x.model for u in placement.units for x in u.llms} - set(specs))
        if unknown:
            raise SimulationError(f"placement uses unknown model type(s) {', '.join(unknown)}")

    # ---- top level ----------------------------------------------------------------------------
    def run(self) -> SimResult:
        try:
            for us in self.units.values():
                self._set_quotas(us)
                if self.policy.quota_period_s > 0:
                    self.env.process(self._ticker(us))
            self.env.process(self._arrivals())
            self.env.run(until=self.horizon_s)
            self._fail_leftovers()
        finally:
            records = self.writer.close()
        self.stats["records"] = self.writer.count
        self.stats["sim_time_s"] = self.env.now
        self.stats["cost_model"] = self.cost.label
        return SimResult(records, self.records_path, self.stats)

    def _arrivals(self) -> Generator[simpy.Event, None, None]:
        df = self.workload.df
        columns = [df[c].to_numpy() for c in ("request_id", "model", "arrival_s", "prompt_tokens", "output_tokens")]
        every = max(1, len(df) // 200)
        for i, (rid, llm, t, prompt, output) in enumerate(zip(*columns, strict=True)):
            if t > self.env.now:
                yield timeout_at(self.env, float(t))
            us = self.units[self._unit_of[llm]]
            us.next_arrival += 1
            self._admit(us, Request(int(rid), str(llm), float(t), int(prompt), int(output)))
            if self.progress and i % every == 0:
                self.progress(self.env.now)

    def _admit(self, us: UnitState, r: Request) -> None:
        llm = us.llms[r.llm]
        total = r.prompt_tokens + r.output_tokens
        if total > llm.spec.max_context:
            self._record(us, r, "failed", f"prompt+output {total} tokens exceeds {llm.spec.name} "
                                           f"context {llm.spec.max_context}")
            return
        if blocks_for_tokens(total, llm.chunk_blocks) > us.unit.kv_blocks:
            self._record(us, r, "failed", f"needs {blocks_for_tokens(total, llm.chunk_blocks)} KV blocks, "
                                           f"unit pool has {us.unit.kv_blocks}")
            return
        llm.waiting.append(r)
        if not (self.policy.exclusive and us.jobs):  # an exclusive policy waits for the job's end
            self._request_decision(us)

    def _ticker(self, us: UnitState) -> Generator[simpy.Event, None, None]:
        period = self.policy.quota_period_s
        while True:
            us.next_tick = self.env.now + period
            yield timeout_at(self.env, us.next_tick)
            busy = any(x.prefill_busy or x.decode_busy for x in us.llms.values())
            if not busy and us.next_arrival >= len(us.arrivals):
                before = {n: x.kv_quota for n, x in us.llms.items()}
                self._set_quotas(us)
                if all(before[n] == x.kv_quota for n, x in us.llms.items()):
                    us.next_tick = math.inf
                    return  # nothing left that a new quota could unblock
            else:
                self._set_quotas(us)
            self._request_decision(us)

    def _set_quotas(self, us: UnitState) -> None:
        quotas = self.policy.quotas(self._view(us))
        if not self.policy.exclusive and sum(quotas.values()) > us.unit.kv_blocks:
            raise SimulationError(f"unit {us.unit.unit_id}: policy {self.policy.name} set KV quotas summing to "
                                  f"{sum(quotas.values())} > pool {us.unit.kv_blocks}")
        for name, q in quotas.items():
            us.llms[name].kv_quota = q

    # ---- decisions ----------------------------------------------------------------------------
    def _request_decision(self, us: UnitState) -> None:
        if us.decide_pending:
            return
        us.decide_pending = True
        event = simpy.Event(self.env)
        event.callbacks.append(lambda _e, us=us: self._decide(us))
        event._ok = True
        event._value = None
        self.env.schedule(event, priority=DECIDE_PRIORITY)

    def _view(self, us: UnitState) -> UnitView:
        return UnitView(us.unit.unit_id, self.env.now, self.mode, us.unit.sm_units, us.sm_free,
                        us.unit.kv_blocks, us.kv_free, tuple(x.view() for x in us.llms.values()))

    def _decide(self, us: UnitState) -> None:
        us.decide_pending = False
        self.stats["decisions"] += 1
        launches = self.policy.decide(self._view(us))
        jobs = [self._start(us, launch) for launch in launches]
        if self.core_slices is not None:
            jobs = self._take_turns(us, jobs)
        if self.interference is not None:
            self._interfere(us, jobs)
        runs = [job for job in jobs if job.steps is not None]
        us.jobs.update((job.job_id, job) for job in jobs if job.steps is None)
        if runs:
            self._plan_runs(us, runs)
            us.jobs.update((job.job_id, job) for job in runs)
        for job in jobs:
            self._run(us, job)

    def _interfere(self, us: UnitState, new: list[Job]) -> None:
        """Slow each job by the jobs beside it on the unit (`InterferenceModel.factor` of its phase,
        its share and theirs). A running job whose neighbours changed runs what is left of its work
        at the new factor from now.

        Done once per decision, after every same-instant change: a decode relaunched at a step
        boundary leaves its neighbours' factors unchanged, so step skipping stays exact. A decode
        run keeps one factor (nothing starts beside it while it runs); the step that contains the
        next event is rescaled at that event, as it is step by step.
        """
        assert self.interference is not None
        now, total = self.env.now, sum(j.sm_pct for j in us.jobs.values()) + sum(j.sm_pct for j in new)
        for job in new:
            job.factor = self.interference.factor(job.phase, job.sm_pct, total - job.sm_pct)
            if job.steps is None:  # a prefill or mixed step; a decode run's steps are timed by plan
                job.end = now + job.alone_s * job.factor
        for job in us.jobs.values():
            factor = self.interference.factor(job.phase, job.sm_pct, total - job.sm_pct)
            if factor != job.factor:
                job.end = now + (job.end - now) / job.factor * factor
                job.factor = factor
                job.version += 1  # the timeout already scheduled for it no longer ends it
                self._run(us, job)
                self.stats["rescaled_jobs"] += 1

    def _take_turns(self, us: UnitState, jobs: list[Job]) -> list[Job]:
        """The jobs that may start now; the others wait for their cores (`_release_cores`).

        A waiting job is timed now as one step (a decode run could not know its horizon), kept in
        `us.jobs` with an unknown end, and started when every job on its cores has ended.
        """
        now = []
        for job in jobs:
            if not self._must_wait(job):
                self._on_cores[job.job_id] = job
                now.append(job)
                continue
            if job.steps is not None:  # a decode: _start left its timing to _plan_runs
                job.plan(self.cost, self.env.now, slack=0, horizon=-math.inf)  # a single step
            self._held.append((us, job, job.end - self.env.now))
            job.end = math.inf
            us.jobs[job.job_id] = job
            self.stats["deferred_launches"] += 1
        return now

    def _must_wait(self, job: Job) -> bool:
        """Does `job` share a core with a running job, or with an older launch still waiting?"""
        cores = set(self._cores(job))
        others = [*self._on_cores.values(), *(held for _, held, _ in self._held)]
        return any(not cores.isdisjoint(self._cores(o)) for o in others)

    def _cores(self, job: Job) -> tuple[int, ...]:
        """The cores `job`'s worker is pinned to: "<LLM>/<phase>" in split mode (a process per phase,
        hwloop.split_runner), else the LLM's one worker."""
        assert self.core_slices is not None
        name = job.llm.placement.name
        return self.core_slices.get(f"{name}/{job.phase}", self.core_slices.get(name, ()))

    def _release_cores(self, job: Job) -> None:
        """`job` has ended: start the waiting launches whose cores are now free, oldest first."""
        del self._on_cores[job.job_id]
        held, self._held = self._held, deque()
        for us, waiting, duration in held:
            if self._must_wait(waiting):
                self._held.append((us, waiting, duration))
            else:
                waiting.end = self.env.now + duration
                self._on_cores[waiting.job_id] = waiting
                self._run(us, waiting)

    def _start(self, us: UnitState, launch: Launch) -> Job:
        """Apply a launch: check it against the budgets, take units and blocks, time its first step."""
        llm = us.llms.get(launch.llm)
        name = self.policy.name
        if llm is None:
            raise SimulationError(f"policy {name} launched {launch.llm!r}, which is not on unit {us.unit.unit_id}")
        if launch.sm_units > us.sm_free:
            raise SimulationError(f"policy {name} over-committed SM units on unit {us.unit.unit_id}: "
                                  f"{launch.sm_units} asked, {us.sm_free} free")
        busy = llm.prefill_busy if launch.phase == "prefill" else llm.decode_busy
        if busy or (self.policy.exclusive and us.sm_free < us.unit.sm_units):
            raise SimulationError(f"policy {name} launched {launch.phase} of {llm.placement.name} on a busy process")
        for rid in launch.preempt:
            self._preempt(us, llm, rid)
        new_ids = set(launch.request_ids)
        admitted = take_waiting(llm.waiting, new_ids) if launch.phase != "decode" else []
        decoding = [r for r in llm.running if r.request_id in new_ids and not r.busy] if launch.phase != "prefill" else []
        if len(admitted) + len(decoding) != len(new_ids):
            raise SimulationError(f"policy {name} launched unknown or busy request(s) for {llm.placement.name}: "
                                  f"{sorted(new_ids - {r.request_id for r in admitted + decoding})[:5]}")
        batch = admitted + decoding
        taken = hold(batch, llm.chunk_blocks)
        if taken > min(llm.kv_quota - llm.kv_used, us.kv_free):
            raise SimulationError(f"policy {name} over-committed KV blocks on unit {us.unit.unit_id}: "
                                  f"{llm.placement.name} needs {taken}, quota slack "
                                  f"{llm.kv_quota - llm.kv_used}, pool free {us.kv_free}")
        llm.running_busy += len(decoding)
        llm.kv_used += taken
        us.kv_free -= taken
        us.sm_free -= launch.sm_units
        if launch.phase == "prefill" or self.mode == "mixed":
            llm.prefill_busy = True
        if launch.phase == "decode" or self.mode == "mixed":
            llm.decode_busy = True
        self.stats["jobs"] += 1
        sm_pct = min(100, launch.sm_units * 10)
        p = llm.placement
        if launch.phase == "prefill":
            dur = self.cost.prefill_time(llm.spec, p.tp, sm_pct, len(admitted), _mean_context(admitted))
        elif launch.phase == "mixed" and admitted:
            dur = mixed_step_time(self.cost, llm.spec, p.tp, sm_pct, len(admitted), _mean_context(admitted),
                                  len(decoding), _mean_context(decoding))
        else:
            dur = math.nan  # a decode run: timed by _plan_runs, which sees the unit after all launches
        if not math.isnan(dur) and not math.isfinite(dur):
            raise SimulationError(f"{self.cost.label}: no latency for {p.name} ({llm.spec.name}) {launch.phase} "
                                  f"batch {len(batch)} at {sm_pct}% SM (unmeasured cell)")
        job = Job(next(self._job_ids), llm, launch.phase, batch, launch.sm_units, sm_pct, self.env.now + dur,
                  admitted=len(admitted), alone_s=dur)
        if math.isnan(dur):
            job.steps = 1
        return job

    def _preempt(self, us: UnitState, llm: LLMState, rid: int) -> None:
        r = next((r for r in llm.running if r.request_id == rid and not r.busy), None)
        if r is None:
            raise SimulationError(f"policy {self.policy.name} preempted request {rid}, not idle-running on {llm.placement.name}")
        llm.running.remove(r)
        freed = requeue_preempted(llm.waiting, r)
        llm.kv_used -= freed
        us.kv_free += freed
        self.stats["preemptions"] += 1

    # ---- decode runs --------------------------------------------------------------------------
    def _plan_runs(self, us: UnitState, runs: list[Job]) -> None:
        """Time each new decode run: one step, or as many as can be skipped over exactly."""
        extend = self.skip_steps and not self._pending_work(us)
        horizon = self._next_event(us) if extend else -math.inf
        # A finish frees blocks and batch room, which only a waiting request could use. (Under
        # core_slices runs also decide when another unit's launch gets its cores: keep them short.)
        through_finishes = self.core_slices is None and not any(x.waiting for x in us.llms.values())
        slacks = [min(job.llm.kv_quota - job.llm.kv_used, us.kv_free) for job in runs]
        for job, slack in zip(runs, slacks, strict=True):
            job.plan(self.cost, self.env.now, slack, horizon, through_finishes)
        first_end = min(job.end for job in runs)
        for job in runs:
            job.truncate(first_end)  # each run's end is an event for the others launched with it
            # Blocks for the run's last step are taken now: step-by-step execution would hold them
            # by the time anything else on the unit can look (the last step contains the next event).
            # Likewise, requests that finish before the last step are gone by then.
            if job.steps == 1:
                continue  # a single step: its blocks were taken at launch
            self._finish_early(us, job)
            grown = job.hold_through_last_step()
            job.llm.kv_used += grown
            us.kv_free -= grown

    def _finish_early(self, us: UnitState, job: Job) -> None:
        finished = job.take_early_finishers()
        if not finished:
            return
        llm = job.llm
        gone = {r for _, r in finished}
        llm.running = [r for r in llm.running if r not in gone]
        llm.running_busy -= len(finished)
        for finish_s, r in finished:
            r.generated, r.busy = r.output_tokens, False
            self._finish(us, llm, r, finish_s)

    def _pending_work(self, us: UnitState) -> bool:
        """Could any idle process on the unit start something? If not, a lone decode may be repeated."""
        for llm in us.llms.values():
            idle_prefill = not (llm.decode_busy if self.mode == "mixed" else llm.prefill_busy)
            if (idle_prefill and len(llm.running) < llm.placement.max_batch
                    and head_fits(llm.waiting, llm.chunk_blocks, min(llm.kv_quota - llm.kv_used, us.kv_free))):
                return True
            if llm.running_busy < len(llm.running):
                return True  # an idle decode process with work, or requests left out of a batch
        return False

    def _next_event(self, us: UnitState) -> float:
        if any(held is us for held, _, _ in self._held):
            return -math.inf  # a launch waits for cores here: runs end after one step, as on hardware
        t = min((job.end for job in us.jobs.values()), default=math.inf)
        if us.next_arrival < len(us.arrivals):
            t = min(t, float(us.arrivals[us.next_arrival]))
        t = min(t, us.next_tick)
        return t if self.horizon_s is None else min(t, self.horizon_s)

    # ---- jobs ---------------------------------------------------------------------------------
    def _run(self, us: UnitState, job: Job) -> None:
        """A job is a single timeout: a process per job would cost two more events for one `yield`."""
        version = job.version

        def end(_event: simpy.Event) -> None:
            if job.version == version:  # else interference moved its end: a later timeout ends it
                self._end(us, job)

        timeout_at(self.env, job.end).callbacks.append(end)

    def _end(self, us: UnitState, job: Job) -> None:
        del us.jobs[job.job_id]
        if self.core_slices is not None:
            self._release_cores(job)
        llm = job.llm
        steps = job.steps or 1
        if job.steps is not None:
            self.stats["decode_steps"] += steps
        done = []
        for r in job.batch:  # one pass: on a busy unit this runs at every step over the whole batch
            r.generated += steps
            r.busy = False
            if r.generated >= r.output_tokens:
                done.append(r)
        llm.running_busy -= len(job.batch) - job.admitted
        for r in job.batch[: job.admitted]:
            if math.isnan(r.first_token_s):  # not set yet: first admission, not a recompute
                r.first_token_s = job.end
            # Oldest first, whatever order same-instant events were processed in.
            bisect.insort(llm.running, r, key=age)
        for r in done:
            llm.running.remove(r)  # few at a time: cheaper than rebuilding the list
            self._finish(us, llm, r, job.end)
        us.sm_free += job.sm_units
        if job.phase == "prefill" or self.mode == "mixed":
            llm.prefill_busy = False
            llm.prefill_idle_since = job.end
        if job.phase == "decode" or self.mode == "mixed":
            llm.decode_busy = False
            llm.decode_idle_since = job.end
        self._request_decision(us)

    def _finish(self, us: UnitState, llm: LLMState, r: Request, finish_s: float) -> None:
        llm.kv_used -= r.blocks
        us.kv_free += r.blocks
        r.blocks = 0
        self._record(us, r, "finished", finish_s=finish_s)

    def _record(self, us: UnitState | None, r: Request, status: str, reason: str = "",
                finish_s: float = math.nan) -> None:
        self.writer.add(r.request_id, r.llm, us.unit.unit_id if us else -1, r.arrival_s, r.first_token_s,
                        finish_s, r.prompt_tokens, r.output_tokens, r.preemptions, status, reason)

    def _fail_leftovers(self) -> None:
        """Whatever is still in the system when the simulation stops is reported, never dropped."""
        stopped = self.horizon_s is not None and self.env.now >= self.horizon_s
        why = f"not finished by horizon {self.horizon_s:g}s" if stopped else "never scheduled (stuck: no KV room)"
        for us in self.units.values():
            in_jobs = [r for job in us.jobs.values() for r in job.batch[: job.admitted]]
            for llm in us.llms.values():
                for r in [*llm.waiting, *llm.running, *(r for r in in_jobs if r.llm == llm.placement.name)]:
                    self._record(us, r, "failed", why)
        if stopped:
            df = self.workload.df
            for row in df[df["arrival_s"] > self.env.now].itertuples(index=False):
                request = Request(int(row.request_id), str(row.model), float(row.arrival_s),
                                  int(row.prompt_tokens), int(row.output_tokens))
                self._record(self.units[self._unit_of[request.llm]], request, "failed",
                             f"arrives after horizon {self.horizon_s:g}s")


@dataclass(eq=False)
class Job:
    job_id: int
    llm: LLMState
    phase: str
    batch: list[Request]
    sm_units: int
    sm_pct: int
    end: float
    admitted: int = 0
    alone_s: float = math.nan  # prefill and mixed steps: duration at this share with nothing beside it
    factor: float = 1.0  # interference slowdown from the jobs beside it (Simulator._interfere)
    version: int = 0  # bumped when interference moves `end`
    steps: int | None = None  # decode runs only: number of steps in this run
    boundaries: list[float] = field(default_factory=list)  # decode runs: when each planned step ends
    _ctx: list[int] = field(default_factory=list)  # multi-step runs: each request's context at launch
    _left: list[int] = field(default_factory=list)  # multi-step runs: tokens each request had to go at launch

    def plan(self, cost: CostModel, now: float, slack: int, horizon: float, through_finishes: bool = False) -> None:
        """Choose how many steps this decode run covers and when each ends.

        Steps: while the batch's KV growth fits `slack` (blocks for step 0 are already held), up to
        the first boundary at or after `horizon` (−inf: a single step), and until the first request
        finishes. With `through_finishes`, until the last one does instead: the batch shrinks at each
        finish, as the decode relaunched after it would (the caller knows nothing else could start).
        """
        n = len(self.batch)
        contexts = [r.prompt_tokens + r.generated for r in self.batch]
        self._one_step(cost, now, sum(contexts) / n)
        if self.end >= horizon:
            return  # the first step already reaches the next event: the common case under load
        left = [r.output_tokens - r.generated for r in self.batch]
        max_steps = max(left) if through_finishes else min(left)
        if max_steps == 1:
            return
        spec, tp, sm_pct = self.llm.spec, self.llm.placement.tp, self.sm_pct
        boundaries = [self.end]  # step 0, timed above
        t = self.end
        for alive, alive_ctx, stop in _segments(contexts, left, max_steps):
            if t >= horizon:
                break
            start = len(boundaries)  # the first step not timed yet
            # Integer sums, then one division: the same mean context step-by-step execution computes;
            # boundaries are sequential sums from `now`, as SimPy adds one step at a time.
            step_time = cost.decode_curve(spec, tp, sm_pct, alive)
            if stop - start <= SHORT_RUN:
                for s in range(start, stop):
                    t += step_time((alive_ctx + alive * s) / alive) * self.factor
                    boundaries.append(t)
                    if t >= horizon:
                        break
                continue
            # Keep the arrays to the steps that fit before `horizon` while step latency does not fall
            # with context. Any cap is exact: a run that ends early is relaunched as it is.
            cap = stop
            step = step_time((alive_ctx + alive * start) / alive) * self.factor
            if horizon < math.inf and step > 0:
                cap = min(stop, start + math.ceil((horizon - t) / step) + 1)
            means = (alive_ctx + alive * np.arange(start, cap, dtype=np.int64)) / alive
            durations = cost.decode_times(spec, tp, sm_pct, alive, means) * self.factor
            boundaries += np.add.accumulate(np.concatenate(([t], durations)))[1:].tolist()
            t = boundaries[-1]
            if cap < stop:
                break
        self._check(t, cost)  # an unmeasured cell makes its step, and so every later boundary, infinite
        self.boundaries = boundaries
        steps = min(self._steps_to(horizon), len(boundaries))  # timed first: the KV check stops there
        steps = steps_within_kv(contexts, left, steps, slack // self.llm.chunk_blocks) if steps > 1 else 1
        self._ctx, self._left = contexts, left
        self._set_steps(steps)

    def _one_step(self, cost: CostModel, now: float, mean_ctx: float) -> None:
        d = cost.decode_time(self.llm.spec, self.llm.placement.tp, self.sm_pct, len(self.batch), mean_ctx) * self.factor
        self._check(d, cost)
        self.steps, self.end = 1, now + d

    def _check(self, duration: float, cost: CostModel) -> None:
        if not math.isfinite(duration):
            raise SimulationError(f"{cost.label}: no decode latency for {self.llm.placement.name} "
                                  f"({self.llm.spec.name}) batch {len(self.batch)} at {self.sm_pct}% SM "
                                  "(unmeasured cell)")

    def _steps_to(self, t: float) -> int:
        """Steps up to and including the first boundary at or after `t`."""
        return bisect.bisect_left(self.boundaries, t) + 1

    def _set_steps(self, k: int) -> None:
        self.steps = k
        self.end = self.boundaries[k - 1]

    def truncate(self, t: float) -> None:
        """End at the first step boundary at or after `t`, if that is earlier than planned."""
        if self.steps is not None and self.steps > 1 and self.end > t:
            self._set_steps(self._steps_to(t))

    def hold_through_last_step(self) -> int:
        """Grow each request to the blocks of its context at the run's last step (call after
        `take_early_finishers`); returns the blocks taken."""
        last, chunk, grown = (self.steps or 1) - 1, self.llm.chunk_blocks, 0
        for r, ctx in zip(self.batch, self._ctx, strict=True):
            blocks = -(-(ctx + last) // BLOCK_TOKENS) * chunk  # blocks_for_tokens, inlined
            grown += blocks - r.blocks
            r.blocks = blocks
        return grown

    def take_early_finishers(self) -> list[tuple[float, Request]]:
        """Remove from the batch the requests that finish before the run's last step, and return
        them with their finish times, earliest first (batch order within a step, as step by step)."""
        if self.steps is None or self.steps == 1 or min(self._left) >= self.steps:
            return []
        early = [(left, r) for left, r in zip(self._left, self.batch, strict=True) if left < self.steps]
        early.sort(key=lambda x: x[0])
        kept = [j for j, left in enumerate(self._left) if left >= self.steps]
        self.batch = [self.batch[j] for j in kept]
        self._ctx = [self._ctx[j] for j in kept]
        self._left = [self._left[j] for j in kept]
        return [(self.boundaries[left - 1], r) for left, r in early]


# Up to this many steps a run is timed with scalar lookups; numpy's per-call costs dominate below it.
SHORT_RUN = 16


def _segments(contexts: list[int], left: list[int], max_steps: int) -> Iterator[tuple[int, int, int]]:
    """Stretches of a decode run over which its batch stays the same, in order, covering steps
    0..max_steps-1: (requests, their summed context at step 0, the step the stretch ends before;
    each starts where the previous one ended). A request with `left` tokens to go takes part in
    steps 0..left-1."""
    n, total, start = len(left), sum(contexts), 0
    if min(left) >= max_steps:
        yield n, total, max_steps
        return
    ending = list(zip(left, contexts, strict=True))
    heapq.heapify(ending)  # popped lazily: a run usually stops at the next event after a few finishes
    while ending:
        request_left, ctx = heapq.heappop(ending)
        if request_left > start:
            yield n, total, min(request_left, max_steps)
            start = request_left
            if start >= max_steps:
                return
        n -= 1
        total -= ctx


def steps_within_kv(contexts: list[int], left: list[int], max_steps: int, slack_chunks: int) -> int:
    """How many of `max_steps` decode steps fit when the batch may grow by `slack_chunks` chunks.

    Step 0's blocks are already held. Request j needs one more chunk at steps first_j,
    first_j + BLOCK_TOKENS, ... with first_j in 1..BLOCK_TOKENS, so step s adds the requests whose
    first_j ≡ s (mod BLOCK_TOKENS) and that still take part (s < left_j); any BLOCK_TOKENS steps in
    a row grow each of them once. Blocks of requests that finished are not counted back: a run that
    stops early is relaunched as it is, so this stays exact.
    """
    if slack_chunks >= len(contexts) * -(-(max_steps - 1) // BLOCK_TOKENS):
        return max_steps  # even if every request grew at every chance: the common case, in O(1)
    residues = [(1 - c) % BLOCK_TOKENS or BLOCK_TOKENS for c in contexts]
    per_residue = [0] * (BLOCK_TOKENS + 1)
    for q in residues:
        per_residue[q] += 1
    leaving = sorted(zip(left, residues, strict=True)) if max_steps > min(left) else []
    alive, gone, grown, s = len(contexts), 0, 0, 1
    while s < max_steps:
        while gone < len(leaving) and leaving[gone][0] <= s:
            per_residue[leaving[gone][1]] -= 1
            alive -= 1
            gone += 1
        stop = min(max_steps, leaving[gone][0]) if gone < len(leaving) else max_steps
        periods = (stop - s) // BLOCK_TOKENS
        if alive:
            periods = max(0, min(periods, (slack_chunks - grown) // alive))
        grown += periods * alive
        s += periods * BLOCK_TOKENS
        for step in range(s, stop):  # under one period to `stop`, or one that would not fit whole
            grown += per_residue[(step - 1) % BLOCK_TOKENS + 1]
            if grown > slack_chunks:
                return step
        s = stop
    return max_steps


def _mean_context(requests: Iterable[Request]) -> float:
    requests = list(requests)
    return sum(r.context_tokens for r in requests) / len(requests) if requests else 0.0


def timeout_at(env: simpy.Environment, t: float) -> simpy.Timeout:
    """A timeout that fires at exactly time `t`, whatever rounding `now + (t - now)` would do."""
    delay = t - env.now
    while env.now + delay < t:
        delay = math.nextafter(delay, math.inf)
    while delay > 0 and env.now + delay > t:
        delay = math.nextafter(delay, -math.inf)
    return env.timeout(max(delay, 0.0))
