"""The SimPy executor: runs a Workload through a Placement and a batching policy in simulated time.

Shape of the model (MuxServe §4):
- Each unit has `sm_units` compute units (10 × 10% SM plus an overload allowance) and one KV pool
  shared by its LLMs. Each LLM has a prefill process and a decode process ("split" mode), or one
  engine process ("mixed" mode, a stock vLLM step serving prefills and decodes together).
- A job takes its SM units for its duration, taken from the CostModel; its requests hold their KV
  blocks.
- The policy is asked what to launch after every change on a unit (an arrival, a job ending, a
  quota tick), once all changes at that instant have been applied.

The unit's bookkeeping (queues, budgets, launches, preemption, ends of jobs, records) is the
`policies.ledger.UnitLedger` the hardware runner uses too; this module keeps only simulated time:
arrivals, quota ticks, job ends as timeouts, decode runs (`sim.decode_runs`, where the argument
that skipping steps is exact is written), interference and the CPU runner's core turn-taking.
Each job is one timeout event whose callback applies its end.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import simpy

from policies.cost import CostModel, FirstSteps, InterferenceModel, RunnerTerms, mixed_step_time
from policies.ledger import STUCK, JobLog, LedgerError, UnitLedger, not_arrived, past_horizon
from policies.placement import SM_UNIT_PCT, Placement, blocks_per_chunk
from policies.records import RecordWriter
from policies.specs import ModelSpec
from policies.view import BatchingPolicy, ExecutionMode, Launch, Request
from sim.decode_runs import Job, SimulationError
from traces.schema import Workload

__all__ = ["SimResult", "SimUnit", "SimulationError", "Simulator", "timeout_at"]

DECIDE_PRIORITY = 2  # after every NORMAL (=1) event at the same instant: decide on settled state


@dataclass(eq=False)
class SimUnit:
    """A unit in simulated time: its ledger, and what is ahead of it (arrivals, ticks, job ends)."""

    ledger: UnitLedger
    arrivals: list[float]  # arrival times of this unit's requests, sorted (a list: read one at a time)
    next_arrival: int = 0  # index into `arrivals` of the first not yet arrived
    next_tick: float = math.inf
    jobs: dict[int, Job] = field(default_factory=dict)  # started jobs by id, and those waiting for cores
    decide_pending: bool = False


@dataclass
class SimResult:
    records: Any  # DataFrame, or None when streamed to `records_path`
    records_path: Path | None
    stats: dict[str, Any]
    jobs: pd.DataFrame | None = None  # one row per job (`log_jobs`), `policies.ledger.JOB_COLUMNS`


class Simulator:
    def __init__(self, workload: Workload, placement: Placement, policy: BatchingPolicy,
                 cost: CostModel, specs: dict[str, ModelSpec], *, mode: ExecutionMode = "split",
                 skip_steps: bool = True, horizon_s: float | None = None,
                 records_path: str | Path | None = None, records_flush_every: int = 65536,
                 progress: Callable[[float], None] | None = None,
                 core_slices: dict[str, tuple[int, ...]] | None = None,
                 interference: InterferenceModel | None = None,
                 runner_terms: RunnerTerms | None = None, log_jobs: bool = False) -> None:
        """`core_slices` (LLM name, or "<LLM>/prefill" and "<LLM>/decode" in split mode → the CPU
        cores its worker is pinned to) models the CPU runners'
        turn-taking: a launch whose cores overlap a running job's waits until that job ends, oldest
        first (hwloop.runner, deferred launches). None: SM shares only, nothing waits.

        `interference` slows jobs that share a unit's SMs (`_interfere`). None, or a model without
        coefficients: jobs beside each other run as if alone, MuxServe's own assumption.

        `runner_terms` (with `core_slices`) adds the CPU runner's measured costs to each job's first
        step: a turn after another engine on its cores, an idle engine's cold start, the dispatch of
        the launch, a token count new to its engine (`_runner_extra`); and slows a job that starts
        while an engine works on other cores, rescaled as those engines start and stop (`_rebeside`).

        `log_jobs`: keep one row per job (`policies.ledger.JobLog`) in `SimResult.jobs`."""
        self.workload, self.placement, self.policy, self.cost = workload, placement, policy, cost
        self.mode, self.skip_steps, self.horizon_s, self.progress = mode, skip_steps, horizon_s, progress
        self.env = simpy.Environment()
        self.writer = RecordWriter(records_path, records_flush_every)
        self.records_path = Path(records_path) if records_path else None
        self.jobs = JobLog() if log_jobs else None
        self.stats: dict[str, Any] = {"decisions": 0, "jobs": 0, "decode_steps": 0, "preemptions": 0}
        self._job_ids = iter(range(1 << 62))
        self.specs = specs
        self._check_models(workload, placement, specs)
        df = workload.df
        chunks = {m: blocks_per_chunk(spec) for m, spec in specs.items()}
        self.units: dict[int, SimUnit] = {}
        for unit in placement.units:
            names = {x.name for x in unit.llms}
            arrivals = df["arrival_s"].to_numpy()[df["model"].isin(names).to_numpy()]
            ledger = UnitLedger(unit, specs, chunks, mode, policy.exclusive, self.writer, jobs=self.jobs)
            self.units[unit.unit_id] = SimUnit(ledger, arrivals.astype(float).tolist())
        self._unit_of = placement.unit_of()
        self.core_slices = core_slices
        self.interference = interference if interference is not None and interference.coef else None
        if self.interference is not None:
            if core_slices is not None:
                raise SimulationError("interference (GPU jobs sharing SMs) and core_slices (CPU workers taking "
                                      "turns on cores) model different hardware: pass one")
            self.stats["rescaled_jobs"] = 0
        self.stats["interference"] = self.interference.label if self.interference else "none"
        if runner_terms is not None and core_slices is None:
            raise SimulationError("runner_terms (a CPU runner's costs) need core_slices (its workers' cores)")
        self.runner_terms = runner_terms
        self._beside_terms = runner_terms is not None and bool(runner_terms.beside)
        self._first_steps = FirstSteps(runner_terms) if runner_terms is not None else None
        if runner_terms is not None:
            self.stats.update(runner_terms=runner_terms.label, runner_extra_s=0.0, turn_starts=0, beside_starts=0,
                              beside_rescales=0)
        self._on_cores: dict[int, Job] = {}  # started jobs, by id, while core_slices is set
        # Launches waiting for their cores, oldest first, with their durations.
        self._deferred: deque[tuple[SimUnit, Job, float]] = deque()
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
            try:
                for unit in self.units.values():
                    self._set_quotas(unit)
                    if self.policy.quota_period_s > 0:
                        self.env.process(self._ticker(unit))
                self._start_arrivals()
                self.env.run(until=self.horizon_s)
            except LedgerError as e:
                raise SimulationError(str(e)) from e
            self._fail_leftovers()
        finally:
            records = self.writer.close()
        self.stats["records"] = self.writer.count
        self.stats["sim_time_s"] = self.env.now
        self.stats["cost_model"] = self.cost.label
        self.stats["preemptions"] = sum(u.ledger.preemptions for u in self.units.values())
        return SimResult(records, self.records_path, self.stats, self.jobs.frame() if self.jobs is not None else None)

    def _start_arrivals(self) -> None:
        """Arrivals as a chain of timeouts, each applying the arrivals of its instant and setting the
        next: a SimPy process would resume a generator at each (BENCHMARKS.md, "arrivals"). The chain
        starts from an event scheduled where `env.process` would schedule its first resumption, so
        every event keeps its place in SimPy's order."""
        df = self.workload.df
        columns = [df[c].to_numpy() for c in ("request_id", "model", "arrival_s", "prompt_tokens", "output_tokens")]
        self._arrival_count = len(df)
        self._arrival_rows = enumerate(_rows(columns))
        self._next_row = next(self._arrival_rows, None)
        start = simpy.Event(self.env)
        start.callbacks.append(self._arrive)
        start._ok = True
        start._value = None
        self.env.schedule(start, priority=simpy.core.URGENT)

    def _arrive(self, _event: simpy.Event) -> None:
        """Apply every arrival at this instant, then wait for the next one's."""
        now, row = self.env.now, self._next_row
        every = max(1, self._arrival_count // 200)
        while row is not None:
            i, (rid, name, t, prompt, output) = row
            if t > now:
                self._next_row = row
                timeout_at(self.env, float(t)).callbacks.append(self._arrive)
                return
            following = next(self._arrival_rows, None)
            unit = self.units[self._unit_of[name]]
            unit.next_arrival += 1
            ledger = unit.ledger
            r = Request(int(rid), str(name), float(t), int(prompt), int(output))
            queued = ledger.arrive(r, ledger.llms[r.llm].spec.max_context)
            if queued and not (self.policy.exclusive and unit.jobs):  # an exclusive policy waits for the job's end
                last = following is None or following[1][2] > t  # the last arrival of this instant
                self._decide_now_or_later(unit, last)
            if self.progress and i % every == 0:
                self.progress(now)
            row = following
        self._next_row = None

    def _ticker(self, unit: SimUnit) -> Generator[simpy.Event, None, None]:
        period = self.policy.quota_period_s
        while True:
            unit.next_tick = self.env.now + period
            yield timeout_at(self.env, unit.next_tick)
            changed = self._set_quotas(unit)
            if not changed and not unit.ledger.busy() and unit.next_arrival >= len(unit.arrivals):
                unit.next_tick = math.inf
                return  # nothing left that a new quota could unblock
            self._request_decision(unit)

    def _set_quotas(self, unit: SimUnit) -> bool:
        return unit.ledger.set_quotas(self.policy.quotas(unit.ledger.view(self.env.now)), self.policy.name)

    # ---- decisions ----------------------------------------------------------------------------
    def _decide_now_or_later(self, unit: SimUnit, last: bool = True) -> None:
        """Decide at once if nothing else happens at this instant (`last`: the caller has nothing
        more to apply either), else after everything that does: the same decision either way."""
        if last and not unit.decide_pending and self.env.peek() > self.env.now:
            self._decide(unit)
        else:
            self._request_decision(unit)

    def _request_decision(self, unit: SimUnit) -> None:
        if unit.decide_pending:
            return
        unit.decide_pending = True
        event = simpy.Event(self.env)
        event.callbacks.append(lambda _e, unit=unit: self._decide(unit))
        event._ok = True
        event._value = None
        self.env.schedule(event, priority=DECIDE_PRIORITY)

    def _decide(self, unit: SimUnit) -> None:
        unit.decide_pending = False
        self.stats["decisions"] += 1
        launches = self.policy.decide(unit.ledger.view(self.env.now))
        jobs = [self._start(unit, launch) for launch in launches]
        if self.core_slices is not None:
            jobs = self._take_turns(unit, jobs)
        if self.interference is not None:
            self._interfere(unit, jobs)
        runs = []
        for job in jobs:
            if job.steps is None:
                unit.jobs[job.job_id] = job
            else:
                runs.append(job)
        if runs:
            self._plan_runs(unit, runs)
            for job in runs:
                unit.jobs[job.job_id] = job
        for job in jobs:
            self._run(unit, job)

    def _interfere(self, unit: SimUnit, new: list[Job]) -> None:
        """Slow each job by the jobs beside it on the unit (`InterferenceModel.factor` of its phase,
        its share and theirs). A running job whose neighbours changed runs what is left of its work
        at the new factor from now.

        Done once per decision, after every same-instant change: a decode relaunched at a step
        boundary leaves its neighbours' factors unchanged, so step skipping stays exact
        (`sim.decode_runs`).
        """
        assert self.interference is not None
        now, total = self.env.now, sum(j.sm_pct for j in unit.jobs.values()) + sum(j.sm_pct for j in new)
        for job in new:
            job.factor = self.interference.factor(job.batch.phase, job.sm_pct, total - job.sm_pct)
            if job.steps is None:  # a prefill or mixed step; a decode run's steps are timed by plan
                job.end = now + job.alone_s * job.factor
        for job in unit.jobs.values():
            factor = self.interference.factor(job.batch.phase, job.sm_pct, total - job.sm_pct)
            if factor != job.factor:
                job.end = now + (job.end - now) / job.factor * factor
                job.factor = factor
                job.version += 1  # the timeout already scheduled for it no longer ends it
                self._run(unit, job)
                self.stats["rescaled_jobs"] += 1

    def _take_turns(self, unit: SimUnit, jobs: list[Job]) -> list[Job]:
        """The jobs that may start now; the others wait for their cores (`_release_cores`).

        A waiting job is timed now as one step (a decode run could not know its horizon), kept in
        `unit.jobs` with an unknown end, and started when every job on its cores has ended.
        """
        now = []
        for job in jobs:
            if not self._must_wait(job):
                self._on_cores[job.job_id] = job
                now.append(job)
                continue
            if job.steps is not None:  # a decode: _start left its timing to _plan_runs
                job.plan(self.cost, self.env.now, slack=0, horizon=-math.inf)  # a single step
            self._deferred.append((unit, job, job.end - self.env.now))
            job.end = math.inf
            unit.jobs[job.job_id] = job
            self.stats["deferred_launches"] += 1
        for job in now:  # after all of them hold their cores: jobs starting together run beside each other
            extra, job.factor = self._runner_extra(job), self._starting_beside(job)
            if job.steps is None:
                job.end = self.env.now + job.alone_s * job.factor + extra
            else:  # a decode: `plan` adds it to the run's first step, and times its steps at the factor
                job.first_extra_s = extra
        if now:
            self._rebeside()
        return now

    def _must_wait(self, job: Job) -> bool:
        """Does `job` share a core with a running job, or with an older launch still waiting?"""
        cores = set(self._cores(job))
        others = [*self._on_cores.values(), *(deferred for _, deferred, _ in self._deferred)]
        return any(not cores.isdisjoint(self._cores(o)) for o in others)

    def _worker(self, job: Job) -> str:
        """The worker process that runs `job`: its phase's in split mode, else the LLM's one."""
        assert self.core_slices is not None
        name = job.batch.llm.name
        per_phase = f"{name}/{job.batch.phase}"
        return per_phase if per_phase in self.core_slices else name

    def _runner_extra(self, job: Job) -> float:
        """`job` starts now on its cores: the runner's measured extra time for its first step
        (`RunnerTerms.first_step_extra`), and note that its worker was the last on those cores."""
        if self._first_steps is None:
            return 0.0
        extra, after_other = self._first_steps.start(self._worker(job), tuple(self._cores(job)), self.env.now,
                                                     job.batch.llm.spec.name, job.batch.step_tokens,
                                                     admitting=job.batch.admitted > 0)
        self.stats["runner_extra_s"] += extra
        self.stats["turn_starts"] += after_other
        return extra

    def _beside_factor(self, job: Job) -> float:
        """`job`'s slowdown while an engine works on other cores (`RunnerTerms.beside_factor`), 1 while
        none does. It holds until the jobs on the cores change (`_rebeside`)."""
        if self.runner_terms is None or not self._has_neighbour(job):
            return 1.0
        return self.runner_terms.beside_factor(job.batch.llm.spec.name, len(self._cores(job)), job.batch.step_tokens)

    def _starting_beside(self, job: Job) -> float:
        """The beside factor of `job`, which starts now (counted if an engine works beside it)."""
        if self.runner_terms is not None and self._has_neighbour(job):
            self.stats["beside_starts"] += 1
        return self._beside_factor(job)

    def _has_neighbour(self, job: Job) -> bool:
        """Does a job run on cores none of which is `job`'s?"""
        cores = set(self._cores(job))
        return any(cores.isdisjoint(self._cores(o)) for o in self._on_cores.values() if o is not job)

    def _rebeside(self) -> None:
        """The jobs on the cores changed: each running job does what is left of its work at the beside
        factor that holds from now, as `_interfere` does for SM shares. The runner's extra for a
        first step counts as work too. A decode run's steps all ran at the factor it is leaving, so
        scaling what is left of the run scales each step left, as step by step would; runs are not
        cut at other units' events, since the runner does not cut them there either (each cut would
        charge another first step's extras)."""
        if not self._beside_terms:
            return
        now = self.env.now
        for job in self._on_cores.values():
            if math.isnan(job.end):
                continue  # a decode run not planned yet: `plan` times it at the factor it started with
            factor = self._beside_factor(job)
            if factor != job.factor:
                job.end = now + (job.end - now) / job.factor * factor
                job.factor = factor
                job.version += 1  # the timeout already scheduled for it no longer ends it
                self._run(self.units[self._unit_of[job.batch.llm.name]], job)
                self.stats["beside_rescales"] += 1

    def _cores(self, job: Job) -> tuple[int, ...]:
        """The cores `job`'s worker is pinned to: "<LLM>/<phase>" in split mode (a process per phase,
        hwloop.split_runner), else the LLM's one worker."""
        assert self.core_slices is not None
        name = job.batch.llm.name
        return self.core_slices.get(f"{name}/{job.batch.phase}", self.core_slices.get(name, ()))

    def _release_cores(self, job: Job) -> None:
        """`job` has ended: start the waiting launches whose cores are now free, oldest first."""
        del self._on_cores[job.job_id]
        deferred, self._deferred = self._deferred, deque()
        for unit, waiting, duration in deferred:
            if self._must_wait(waiting):
                self._deferred.append((unit, waiting, duration))
            else:
                self._on_cores[waiting.job_id] = waiting
                waiting.start = self.env.now
                waiting.factor = self._starting_beside(waiting)
                waiting.end = self.env.now + duration * waiting.factor + self._runner_extra(waiting)
                self._run(unit, waiting)
        self._rebeside()

    def _start(self, unit: SimUnit, launch: Launch) -> Job:
        """Apply a launch to the unit's ledger and time its job (a decode's timing waits for
        `_plan_runs`, which sees the unit after all of this decision's launches)."""
        batch = unit.ledger.apply(launch, self.policy.name)
        self.stats["jobs"] += 1
        sm_pct = min(100, launch.sm_units * SM_UNIT_PCT)
        llm = batch.llm
        p = llm.placement
        admitted = batch.admitted
        if launch.phase == "prefill":
            dur = self.cost.prefill_time(llm.spec, p.tp, sm_pct, admitted, batch.admitted_context / admitted
                                         if admitted else 0.0)
        elif launch.phase == "mixed" and batch.admitted:
            decoding = batch.decoding
            dur = mixed_step_time(self.cost, llm.spec, p.tp, sm_pct, batch.admitted,
                                  batch.admitted_context / batch.admitted, decoding,
                                  batch.decoding_context / decoding if decoding else 0.0)
        else:
            return Job(next(self._job_ids), batch, sm_pct, math.nan, self.env.now, steps=1)  # a decode run
        if not math.isfinite(dur):
            raise SimulationError(f"{self.cost.label}: no latency for {p.name} ({llm.spec.name}) {launch.phase} "
                                  f"batch {len(batch.requests)} at {sm_pct}% SM (unmeasured cell)")
        return Job(next(self._job_ids), batch, sm_pct, self.env.now + dur, self.env.now, alone_s=dur)

    # ---- decode runs --------------------------------------------------------------------------
    def _plan_runs(self, unit: SimUnit, runs: list[Job]) -> None:
        """Time each new decode run: one step, or as many as can be skipped over exactly
        (`sim.decode_runs`)."""
        ledger = unit.ledger
        extend = self.skip_steps and not ledger.idle_work()
        horizon = self._next_event(unit) if extend else -math.inf
        # A finish frees blocks and batch room, which only a waiting request could use. (Under
        # core_slices runs also decide when another unit's launch gets its cores: keep them short.)
        through_finishes = self.core_slices is None and not ledger.has_waiting()
        now = self.env.now
        slacks = [ledger.slack(job.batch.llm) for job in runs]  # all before any run holds more
        for job, slack in zip(runs, slacks, strict=True):
            job.plan(self.cost, now, slack, horizon, through_finishes)
        if len(runs) > 1:
            first_end = min(job.end for job in runs)
            for job in runs:
                job.truncate(first_end)  # each run's end is an event for the others launched with it
        for job in runs:
            if job.steps == 1:
                continue  # a single step: its blocks were taken at launch
            ledger.finish_early(job.batch, job.early_finishers())
            ledger.hold_for_steps(job.batch, job.steps)

    def _next_event(self, unit: SimUnit) -> float:
        if self._deferred and any(deferred is unit for deferred, _, _ in self._deferred):
            return -math.inf  # a launch waits for cores here: runs end after one step, as on hardware
        t = min([job.end for job in unit.jobs.values()]) if unit.jobs else math.inf
        if unit.next_arrival < len(unit.arrivals):
            t = min(t, unit.arrivals[unit.next_arrival])
        t = min(t, unit.next_tick)
        return t if self.horizon_s is None else min(t, self.horizon_s)

    # ---- jobs ---------------------------------------------------------------------------------
    def _run(self, unit: SimUnit, job: Job) -> None:
        """A job is a single timeout: a process per job would cost two more events for one `yield`."""
        version = job.version

        def end(_event: simpy.Event) -> None:
            if job.version == version:  # else interference moved its end: a later timeout ends it
                self._end(unit, job)

        timeout_at(self.env, job.end).callbacks.append(end)

    def _end(self, unit: SimUnit, job: Job) -> None:
        del unit.jobs[job.job_id]
        if self.core_slices is not None:
            if self._first_steps is not None:
                self._first_steps.end(tuple(self._cores(job)), job.end)
            self._release_cores(job)
        steps = job.steps or 1
        if job.steps is not None:
            self.stats["decode_steps"] += steps
        first_end = min(job.boundaries[0], job.end) if job.boundaries else job.end
        unit.ledger.end(job.batch, steps, first_end, job.end, job.start)
        self._decide_now_or_later(unit)

    def _fail_leftovers(self) -> None:
        """Whatever is still in the system when the simulation stops is reported, never dropped."""
        stopped = self.horizon_s is not None and self.env.now >= self.horizon_s
        why = past_horizon(self.horizon_s) if stopped else STUCK  # type: ignore[arg-type]
        for unit in self.units.values():
            unit.ledger.fail_leftovers(why)
        if stopped:
            df = self.workload.df
            for row in df[df["arrival_s"] > self.env.now].itertuples(index=False):
                request = Request(int(row.request_id), str(row.model), float(row.arrival_s),
                                  int(row.prompt_tokens), int(row.output_tokens))
                self.units[self._unit_of[request.llm]].ledger.fail(request, not_arrived(why))


def _rows(columns: list[Any], chunk: int = 1024) -> Iterator[tuple[Any, ...]]:
    """The rows of a trace's columns (numpy arrays) as Python values, converted `chunk` rows at a
    time: an element of a numpy array costs a scalar object per read, and converting the whole
    trace at once would keep a copy of it as Python objects (tests/test_sim.py, memory)."""
    for start in range(0, len(columns[0]), chunk):
        yield from zip(*(c[start:start + chunk].tolist() for c in columns), strict=True)


def timeout_at(env: simpy.Environment, t: float) -> simpy.Timeout:
    """A timeout that fires at exactly time `t`, whatever rounding `now + (t - now)` would do."""
    now = env.now
    delay = t - now
    while now + delay < t:
        delay = math.nextafter(delay, math.inf)
    while delay > 0 and now + delay > t:
        delay = math.nextafter(delay, -math.inf)
    return env.timeout(delay if delay > 0.0 else 0.0)
