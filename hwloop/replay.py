"""What both hardware runners do alike: replay a Workload in wall-clock time on worker processes.

The mixed runner (`hwloop.runner.Runner`, one vLLM engine per LLM) and the split runner
(`hwloop.split_runner.SplitRunner`, a prefill and a decode worker per LLM over one KV pool per
unit) differ only in their workers and in what a launch means for them. Everything else lives here
once, in `ReplayRunner`:

- the set-up checks every placement must pass, the work folder, the CPU cores of each unit;
- the wall-clock loop: arrivals at their trace times, quota ticks (`policy.quotas` at start and
  every `quota_period_s`), a decision for every unit that changed, flushes, progress, waiting on
  the workers' sockets, and the end (all done, past the horizon, or stuck);
- the unit ledgers (`policies.ledger.UnitLedger`), the same bookkeeping the simulator uses: this
  module keeps only the wall clock, the workers and the signals;
- decode runs (the simulator's step skipping): a lone decode repeats in its worker without a round
  trip, and is asked to stop (`Yield`) at its next step boundary when anything changes on its unit;
- CPU core sharing: workers whose core sets overlap never step at the same time; a launch whose
  cores are busy waits (`stats["deferred_launches"]`), oldest first so none starves;
- checking each result against its launch before any state changes;
- crash safety: on a worker crash, Ctrl-C or SIGTERM every request not finished is recorded as
  failed with the cause, the records file is closed, every worker is reaped and the MPS daemon (if
  started) stopped; then the error is raised.

A runner subclass builds its workers (`_build`), turns a launch into a command (`_start`), applies
a result to its ledger (`_end`) and says when a decode may repeat (`_may_repeat`).
"""

from __future__ import annotations

import math
import multiprocessing.connection as mpc
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwloop.kv_pool import PoolError
from hwloop.mirror import gpu_core_table
from hwloop.partition import Device, MPSDaemon, PartitionError, Slice, overlapping
from hwloop.process import Terminated, WorkerError, WorkerProcess, Yield, start_workers
from hwloop.speed import SpeedMonitor
from policies.ledger import (
    STUCK,
    Batch,
    JobLog,
    LedgerError,
    UnitLedger,
    not_arrived,
    past_horizon,
    steps_within_kv,
)
from policies.placement import SM_UNIT_PCT, Placement, Unit
from policies.records import RecordWriter
from policies.specs import ModelSpec
from policies.view import BatchingPolicy, Launch, Request
from traces.schema import Workload


class RunnerError(RuntimeError):
    """A run that cannot go on: bad set-up, a policy breaking the hardware's rules, engine deviation."""


@dataclass
class RunnerConfig:
    records_path: str | Path | None = None  # Parquet, streamed; None: records returned as a frame
    work_dir: str | Path | None = None  # worker logs and dummy model folders; None: a temp folder
    device: Device = "cpu"
    # CPU: cores standing in for each GPU index of the placement; None splits this process's cores
    # evenly over the GPU indices the placement uses.
    gpu_cores: dict[int, tuple[int, ...]] | None = None
    model_dirs: dict[str, str] = field(default_factory=dict)  # model type -> real checkpoint folder
    max_model_len: int | None = None  # cap on each engine's context (default: the model's own)
    horizon_s: float | None = None  # stop the replay here; what is unfinished is recorded as failed
    startup_timeout_s: float = 600.0
    step_timeout_s: float = 600.0
    strict: bool = True  # an engine step that deviates from its launch stops the run
    use_mps: bool = True  # CUDA only: workers are MPS clients at their shares (False: each has the whole GPU)
    mps: MPSDaemon | None = None  # CUDA: a running daemon of the caller's, which the run neither starts nor stops
    cuda_memory_fraction: float | None = None  # CUDA only: per engine; None = 0.9 / engines per GPU
    flush_every_s: float = 5.0
    progress: Callable[[float], None] | None = None  # called with the replay time about once a second
    decode_runs: bool = True  # let a lone decode repeat in the worker without a round trip (exact)
    log_jobs: bool = False  # keep one row per job (`policies.ledger.JobLog`) in `RunResult.jobs`


@dataclass
class RunResult:
    records: Any  # DataFrame, or None when streamed to `records_path`
    records_path: Path | None
    stats: dict[str, Any]
    jobs: pd.DataFrame | None = None  # one row per job (`log_jobs`), `policies.ledger.JOB_COLUMNS`


@dataclass(eq=False)
class RunnerUnit:
    """A unit in wall-clock time: its ledger, when its quotas are next asked, whether it changed."""

    ledger: UnitLedger
    next_tick: float = math.inf
    dirty: bool = True


@dataclass(eq=False)
class Proc:
    """One worker process of an LLM, the phase it runs ("mixed", "prefill" or "decode"), and the
    job it runs or waits to run."""

    llm: str
    phase: str
    unit_id: int
    slice: Slice
    worker: WorkerProcess
    job: Job | None = None


@dataclass(eq=False)
class Job:
    """A launch on its way through a worker: the ledger's batch and the command sent for it."""

    proc: Proc
    batch: Batch
    cmd: Any  # the worker's command: a StepCmd (mixed), a PrefillCmd or a DecodeCmd (split)
    dispatched: bool = False
    t_sent: float = math.inf  # monotonic time the job (or run) was sent to the worker
    yielded: bool = False

    @property
    def max_steps(self) -> int:
        return getattr(self.cmd, "max_steps", 1)  # a prefill is one step


class ReplayRunner:
    """The wall-clock replay shared by both runners; see the module docstring for the split of work."""

    mode: str  # the policy view's mode, also the runner's name in stats
    # May the policy launch beside a decode run it has just asked to yield? Split: yes, the run's
    # decode shows as busy. Mixed: no, a vLLM step decodes every request of its engine, so the
    # unit's next decision waits for the run's step boundary and the KV accounting stays exact.
    decide_beside_runs: bool

    def __init__(self, workload: Workload, placement: Placement, policy: BatchingPolicy,
                 specs: dict[str, ModelSpec], config: RunnerConfig | None = None) -> None:
        self.workload, self.placement, self.policy, self.specs = workload, placement, policy, specs
        self.config = config or RunnerConfig()
        self.stats: dict[str, Any] = {"decisions": 0, "steps": 0, "decode_runs": 0, "preemptions": 0, "anomalies": [],
                                      "deferred_launches": 0, "policy": policy.name, "mode": self.mode,
                                      "device": self.config.device}
        self._decide_s: list[float] = []  # wall time of each decision: view, policy, launch, send
        self._decide_cpu_s: list[float] = []  # the same in this thread's CPU time (immune to other load)
        self._step_s: dict[str, list[float]] = {}  # phase -> duration of each step its workers ran
        self._check_inputs()
        self.writer = RecordWriter(self.config.records_path)
        self.jobs = JobLog() if self.config.log_jobs else None  # handed to every unit's ledger
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._mps: MPSDaemon | None = None
        self.units: dict[int, RunnerUnit] = {}
        self.workers: list[WorkerProcess] = []  # every worker process this run started
        self._procs: dict[tuple[str, str], Proc] = {}  # (LLM, phase) -> its worker
        self._unit_of: dict[str, int] = placement.unit_of()
        self._by_conn: dict[Any, Proc] = {}  # the workers running a job, by their socket
        self._deferred: deque[Job] = deque()
        self._t0 = 0.0
        df = workload.df
        self._rows = [df[c].to_numpy() for c in ("request_id", "model", "arrival_s", "prompt_tokens", "output_tokens")]
        self._next_arrival = 0

    # ---- what a runner adds ---------------------------------------------------------------------
    def _build(self, work: Path) -> None:
        """Create every worker (not started) in `_procs` and every unit's ledger in `units`."""
        raise NotImplementedError

    def _context_limit(self, unit: RunnerUnit, r: Request) -> int:
        """The longest context the LLM's workers accept; longer requests fail on arrival."""
        raise NotImplementedError

    def _start(self, unit: RunnerUnit, launch: Launch) -> Job:
        """Check a launch against the workers' rules, apply it to the ledger, make its command."""
        raise NotImplementedError

    def _may_repeat(self, unit: RunnerUnit, job: Job) -> bool:
        """Is `job`, the one job just launched on the unit, a decode the policy would relaunch as is
        after each step? Then it may run as a decode run."""
        raise NotImplementedError

    def _extend(self, unit: RunnerUnit, job: Job, steps: int) -> None:
        """Turn a launched, not yet sent decode into a run of up to `steps` steps."""
        raise NotImplementedError

    def _shorten(self, unit: RunnerUnit, job: Job) -> None:
        """Turn a decode run not yet sent back into a single step (something changed on its unit)."""
        raise NotImplementedError

    def _check(self, job: Job, reply: Any) -> None:
        """Raise or record if the worker did not do what was launched (`_deviations`)."""
        raise NotImplementedError

    def _end(self, unit: RunnerUnit, job: Job, reply: Any) -> None:
        """Apply a checked result to the unit's ledger."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free what the runner holds beside its workers (split: the KV pools); runs whatever happened."""

    # ---- set-up ---------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        placed = self.placement.unit_of()
        missing = [m for m in self.workload.models if m not in placed]
        if missing:
            raise RunnerError(f"LLM(s) {', '.join(missing)} in the workload are placed on no unit "
                              f"(placement '{self.placement.policy}' has {', '.join(placed) or 'none'})")
        unknown = sorted({x.model for u in self.placement.units for x in u.llms} - set(self.specs))
        if unknown:
            raise RunnerError(f"placement uses model type(s) {', '.join(unknown)} with no ModelSpec")

    def _work_dir(self) -> Path:
        if self.config.work_dir is not None:
            path = Path(self.config.work_dir)
            path.mkdir(parents=True, exist_ok=True)
            return path
        self._tmp = tempfile.TemporaryDirectory(prefix=f"muxsim-{self.mode}-")
        return Path(self._tmp.name)

    def _unit_cores(self, unit: Unit) -> list[int]:
        """The unit's cores: `gpu_cores` of its GPU indices, or this process's cores split evenly."""
        try:
            table = self.config.gpu_cores or gpu_core_table(sorted({g for u in self.placement.units for g in u.gpus}))
        except PartitionError as e:
            raise RunnerError(str(e)) from None
        return [c for g in unit.gpus for c in table[g]]

    # ---- top level ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        failure = "run interrupted"
        try:
            with _sigterm_raises():
                self._build(self._work_dir())
                procs = list(self._procs.values())
                self.workers = [p.worker for p in procs]
                t = time.monotonic()
                readies = start_workers(self.workers, self.config.startup_timeout_s)
                self.stats["startup_s"] = time.monotonic() - t
                self.stats["workers"] = {p.worker.name: {"pid": r.pid, "cores": list(r.cores), "import_s": r.import_s,
                                                         "build_s": r.build_s, "torch_threads": r.torch_threads,
                                                         "share_pct": p.slice.share_pct}
                                         for p, r in zip(procs, readies, strict=True)}
                self.stats["versions"] = readies[0].versions if readies else {}
                self._replay()
                failure = ""
        except WorkerError as e:
            failure = f"worker failed: {str(e).splitlines()[0]}"
            raise
        except Terminated:
            failure = "run interrupted (SIGTERM)"
            raise
        except KeyboardInterrupt:
            failure = "run interrupted (SIGINT)"
            raise
        except Exception as e:
            failure = f"runner error: {e}"
            raise
        finally:
            try:
                if failure:
                    self._fail_leftovers(failure)
            finally:
                self._shutdown()
        return self._result()

    def _mps_daemon(self, work: Path) -> MPSDaemon | None:
        """CUDA with MPS: the caller's daemon, else one of this run's own (stopped at its end)."""
        if self.config.device != "cuda" or not self.config.use_mps:
            return None
        if self.config.mps is not None:
            return self.config.mps
        self._mps = MPSDaemon(work / "mps")
        self._mps.start()
        return self._mps

    def _shutdown(self) -> None:
        """Every child reaped, the MPS daemon stopped and the records file closed, whatever happened."""
        try:
            for h in self.workers:
                h.stop()
        finally:
            try:
                if self._mps is not None:
                    self._mps.stop()
            finally:
                try:
                    self._release()
                finally:
                    self._records = self.writer.close()
                    if self._tmp is not None:
                        self._tmp.cleanup()

    def _result(self) -> RunResult:
        self.stats["records"] = self.writer.count
        self.stats["preemptions"] = sum(u.ledger.preemptions for u in self.units.values())
        self.stats["decide_ms"] = summary(self._decide_s, 1e3)
        self.stats["decide_cpu_ms"] = summary(self._decide_cpu_s, 1e3)
        self.stats["step_ms"] = summary([s for steps in self._step_s.values() for s in steps], 1e3)
        path = Path(self.config.records_path) if self.config.records_path else None
        return RunResult(self._records, path, self.stats, self.jobs.frame() if self.jobs is not None else None)

    def _now(self) -> float:
        return time.monotonic() - self._t0

    # ---- the replay loop ------------------------------------------------------------------------
    def _replay(self) -> None:
        arrivals = self._rows[2]
        horizon = self.config.horizon_s if self.config.horizon_s is not None else math.inf
        period = self.policy.quota_period_s
        self._t0 = time.monotonic()
        cpu0 = time.process_time()
        cores = sorted({c for p in self._procs.values() for c in p.slice.cores})
        speed = SpeedMonitor(cores)  # how fast the machine ran meanwhile (hwloop.speed)
        try:
            with speed:
                self._loop(arrivals, horizon, period)
        finally:
            self.stats["replay_s"] = self._now()
            self.stats["runner_cpu_s"] = time.process_time() - cpu0
            self.stats["speed_probe_ms"] = speed.summary()

    def _loop(self, arrivals: np.ndarray, horizon: float, period: float) -> None:
        for unit in self.units.values():
            self._set_quotas(unit)
            unit.next_tick = period if period > 0 else math.inf
        next_flush = self.config.flush_every_s
        next_progress = 0.0
        while True:
            now = self._now()
            if now >= horizon:
                self._fail_leftovers(past_horizon(horizon))
                return
            while self._next_arrival < len(arrivals) and arrivals[self._next_arrival] <= now:
                self._arrive(self._request(self._next_arrival))
                self._next_arrival += 1
            for unit in self.units.values():
                if unit.next_tick <= now:
                    self._set_quotas(unit)
                    unit.next_tick += period
                    unit.dirty = True
            for unit in self.units.values():
                if unit.dirty and (not self._yield_runs(unit) or self.decide_beside_runs):
                    self._decide(unit)
            if now >= next_flush:
                self.writer.flush()
                next_flush = now + self.config.flush_every_s
            if self.config.progress and now >= next_progress:
                self.config.progress(now)
                next_progress = now + 1.0
            if not self._by_conn and self._next_arrival == len(arrivals):
                if not any(unit.ledger.has_requests() for unit in self.units.values()):
                    return
                if not self._unstick():
                    self._fail_leftovers(STUCK)
                    return
            wake = min(float(arrivals[self._next_arrival]) if self._next_arrival < len(arrivals) else math.inf,
                       min(unit.next_tick for unit in self.units.values()), horizon, next_flush,
                       next_progress if self.config.progress else math.inf)
            timeout = max(0.0, wake - self._now())
            if self._by_conn:
                for conn in mpc.wait([*self._by_conn], timeout=min(timeout, self.config.step_timeout_s)):
                    self._job_done(self._by_conn[conn])
                self._check_hung()
            elif timeout > 0:
                time.sleep(timeout)

    def _check_hung(self) -> None:
        late = [p for p in self._by_conn.values()
                if p.job and time.monotonic() - p.job.t_sent > self.config.step_timeout_s]
        if late:
            names = ", ".join(p.worker.describe() for p in late)
            raise WorkerError(f"no result from {names} within step_timeout_s={self.config.step_timeout_s:g} s")

    def _unstick(self) -> bool:
        """Nothing runs, nothing will arrive, requests wait: can a new KV quota let one in?"""
        changed = False
        for unit in self.units.values():
            if self._set_quotas(unit):
                changed = unit.dirty = True
        if changed:
            for unit in self.units.values():
                if unit.dirty:
                    self._decide(unit)
        return bool(self._by_conn)

    def _request(self, i: int) -> Request:
        rid, name, t, prompt, output = (col[i] for col in self._rows)
        return Request(int(rid), str(name), float(t), int(prompt), int(output))

    def _arrive(self, r: Request) -> bool:
        """Queue an arrival on its unit's ledger; False if it failed there (too long for the workers
        or the unit's KV pool: recorded as failed with the reason)."""
        unit = self.units[self._unit_of[r.llm]]
        if not unit.ledger.arrive(r, self._context_limit(unit, r)):
            return False
        unit.dirty = True
        return True

    def _set_quotas(self, unit: RunnerUnit) -> bool:
        quotas = self.policy.quotas(unit.ledger.view(self._now()))
        try:
            return unit.ledger.set_quotas(quotas, self.policy.name)
        except LedgerError as e:
            raise RunnerError(str(e)) from e

    # ---- decisions and launches -----------------------------------------------------------------
    def _decide(self, unit: RunnerUnit) -> None:
        unit.dirty = False
        if self.policy.exclusive and unit.ledger.busy():
            return
        t, cpu = time.perf_counter(), time.thread_time()
        launches = self.policy.decide(unit.ledger.view(self._now()))
        jobs = [self._start(unit, launch) for launch in launches]
        if self.config.decode_runs and len(jobs) == 1 and self._may_repeat(unit, jobs[0]):
            self._plan_run(unit, jobs[0])
        for job in jobs:
            self._dispatch(job)
        self._decide_s.append(time.perf_counter() - t)
        self._decide_cpu_s.append(time.thread_time() - cpu)
        self.stats["decisions"] += 1

    def _check_share(self, launch: Launch, proc: Proc | None) -> None:
        """A worker's share of its unit is fixed when it starts: a launch must ask for exactly that."""
        if proc is not None and min(100, launch.sm_units * SM_UNIT_PCT) != proc.slice.share_pct:
            raise RunnerError(f"policy {self.policy.name} launched {proc.worker.name} at "
                              f"{launch.sm_units * SM_UNIT_PCT}% but its worker was started at "
                              f"{proc.slice.share_pct}% (a process's share is fixed)")

    def _apply(self, unit: RunnerUnit, launch: Launch) -> Batch:
        """The launch applied to the unit's ledger, which checks it against the unit's budgets."""
        try:
            return unit.ledger.apply(launch, self.policy.name)
        except (LedgerError, PoolError) as e:
            raise RunnerError(str(e)) from e

    def _plan_run(self, unit: RunnerUnit, job: Job) -> None:
        """How many steps a decode run may take: until its first request finishes, and as long as
        its KV growth fits the slack (its first step's blocks are charged already)."""
        batch = job.batch
        contexts = [r.context_tokens for r in batch.requests]
        left = [r.remaining_tokens for r in batch.requests]
        steps = steps_within_kv(contexts, left, batch.min_left, unit.ledger.slack(batch.llm) // batch.llm.chunk_blocks)
        if steps > 1:
            self._extend(unit, job, steps)

    def _yield_runs(self, unit: RunnerUnit) -> bool:
        """Ask the unit's decode runs to stop at their next step boundary: something changed, so the
        policy may decide otherwise. True if any run is in progress."""
        running = False
        for proc in self._procs.values():
            job = proc.job
            if proc.unit_id != unit.ledger.unit.unit_id or job is None or job.max_steps == 1:
                continue
            if not job.dispatched:
                self._shorten(unit, job)
            elif not job.yielded:
                job.yielded = True
                proc.worker.send(Yield())
            running = running or job.dispatched
        return running

    def _dispatch(self, job: Job) -> None:
        """Send the job now, or defer it while another worker runs on any of its cores.

        A deferred launch also waits behind older deferred launches on the same cores, so none starves.
        """
        if self._must_wait(job):
            self._deferred.append(job)
            self.stats["deferred_launches"] += 1
        else:
            self._send(job)

    def _must_wait(self, job: Job) -> bool:
        cores = job.proc.slice.cores
        if not cores:
            return False  # GPU: MPS shares the SMs, nothing to serialise
        return (any(overlapping(cores, p.slice.cores) for p in self._by_conn.values())
                or any(overlapping(cores, j.proc.slice.cores) for j in self._deferred))

    def _send(self, job: Job) -> None:
        job.dispatched = True
        job.t_sent = time.monotonic()
        job.proc.worker.send(job.cmd)
        assert job.proc.worker.conn is not None
        self._by_conn[job.proc.worker.conn] = job.proc

    def _release_deferred(self) -> None:
        """Start deferred launches, oldest first, as far as their cores are now free."""
        deferred, self._deferred = self._deferred, deque()
        for job in deferred:
            if self._must_wait(job):
                self._deferred.append(job)
            else:
                self._send(job)

    def _job_done(self, proc: Proc) -> None:
        reply = proc.worker.recv(what=f"the result of a {proc.phase} job")
        job = proc.job
        assert proc.worker.conn is not None and job is not None
        del self._by_conn[proc.worker.conn]
        self._check(job, reply)
        self.stats["steps"] += reply.steps
        self._step_s.setdefault(proc.phase, []).extend(reply.step_s)
        proc.job = None
        unit = self.units[proc.unit_id]
        self._end(unit, job, reply)
        unit.dirty = True
        self._release_deferred()

    def _deviations(self, job: Job, steps: int, tokens: dict[int, int], finished: tuple[int, ...] | None,
                    anomalies: list[str]) -> None:
        """Did the worker do what was launched: `steps` within the launch, one token per request per
        step, the right requests done (`finished`, None where a job cannot finish any)?

        Checked before any state changes, so a strict stop still records the job's requests.
        """
        if not 1 <= steps <= job.max_steps:
            anomalies.append(f"ran {steps} steps, launched for at most {job.max_steps}")
        for r in job.batch.requests:
            if tokens.get(r.request_id, 0) != steps:
                anomalies.append(f"request {r.request_id} got {tokens.get(r.request_id, 0)} tokens "
                                 f"in {steps} step(s)")
        if finished is not None:
            expected = {r.request_id for r in job.batch.requests if r.remaining_tokens <= steps}
            if expected != set(finished):
                anomalies.append(f"worker finished {sorted(finished)}, runner expected {sorted(expected)}")
        if anomalies:
            name = job.proc.worker.name
            self.stats["anomalies"].extend(f"{name}: {a}" for a in anomalies)
            if self.config.strict:
                raise RunnerError(f"worker {name} deviated from its launch: {'; '.join(anomalies[:3])}")

    # ---- records --------------------------------------------------------------------------------
    def _fail_leftovers(self, why: str) -> None:
        """Every request not finished is recorded once as failed with `why`; nothing is dropped."""
        for unit in self.units.values():
            unit.ledger.fail_leftovers(why)
        for proc in self._procs.values():
            proc.job = None
        for i in range(self._next_arrival, len(self._rows[0])):
            r = self._request(i)
            unit = self.units.get(self._unit_of[r.llm])
            if unit is None:
                continue  # the runner stopped before its units were built: no ledger to record in
            unit.ledger.fail(r, not_arrived(why))
        self._next_arrival = len(self._rows[0])


def summary(values: list[float], scale: float) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values) * scale
    return {"n": len(a), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception for the run's duration, so cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
