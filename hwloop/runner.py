"""The hardware runner: replays a Workload in wall-clock time on real vLLM engines.

It executes the same `Placement` and `BatchingPolicy` objects as the simulator and writes the same
request records (`policies.records`), so a run here and a simulation can be compared row for row.

Execution semantics ("mixed" mode, the only one a stock vLLM engine can run):
- One worker process per placed LLM, pinned to a slice of its unit (`hwloop.partition`) at the
  share it will be launched with, fixed for the whole run (`worker_share_pct`).
- Each unit's requests (tokens generated, KV blocks held, first-token time, preemptions), SM units
  and KV pool are kept by a `policies.ledger.UnitLedger`, the same bookkeeping the simulator uses;
  this module keeps only the wall clock, the workers, the step checks and the signals. The policy
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
  blocks than the unit's pool) fail on arrival with a reason; nothing is dropped. On a worker crash, Ctrl-C or
  SIGTERM every request not finished is recorded as failed with the cause, the records file is
  closed, every worker is reaped and the MPS daemon (if started) stopped; then the error is raised.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hwloop.engine import engine_config, write_model_dir
from hwloop.partition import (
    Device,
    MPSDaemon,
    Slice,
    available_cores,
    cpu_slices,
    cuda_slices,
    overlapping,
)
from hwloop.worker import (
    Admit,
    StepCmd,
    StepDone,
    WorkerError,
    WorkerHandle,
    WorkerSpec,
    Yield,
    start_workers,
)
from policies.ledger import (
    STUCK,
    Batch,
    LedgerError,
    UnitLedger,
    not_arrived,
    past_horizon,
    steps_within_kv,
)
from policies.placement import SM_UNIT_PCT, Placement, Unit, blocks_per_chunk
from policies.records import RecordWriter
from policies.specs import ModelSpec
from policies.view import BatchingPolicy, Launch, Request
from traces.schema import Workload


class RunnerError(RuntimeError):
    """A run that cannot go on: bad set-up, a policy breaking the hardware's rules, engine deviation."""


class Interrupted(RuntimeError):
    """The run was stopped from outside (SIGTERM); Ctrl-C arrives as KeyboardInterrupt."""


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
    use_mps: bool = True  # CUDA only
    cuda_memory_fraction: float | None = None  # CUDA only: per engine; None = 0.9 / engines per GPU
    flush_every_s: float = 5.0
    progress: Callable[[float], None] | None = None  # called with the replay time about once a second
    decode_runs: bool = True  # let a lone decode repeat in the worker without a round trip (exact)


@dataclass
class RunResult:
    records: Any  # DataFrame, or None when streamed to `records_path`
    records_path: Path | None
    stats: dict[str, Any]


@dataclass(eq=False)
class Engine:
    """One LLM's worker process, and the step it runs or waits to run."""

    name: str
    unit_id: int
    slice: Slice
    worker: WorkerHandle
    job: Job | None = None


@dataclass(eq=False)
class RunnerUnit:
    """A unit in wall-clock time: its ledger, when its quotas are next asked, whether it changed."""

    ledger: UnitLedger
    next_tick: float = math.inf
    dirty: bool = True


@dataclass(eq=False)
class Job:
    engine: Engine
    batch: Batch
    cmd: StepCmd
    t_launch: float
    dispatched: bool = False
    t_sent: float = math.inf  # monotonic time the step (or run) was sent to the worker
    yielded: bool = False

    @property
    def decode_only(self) -> bool:
        return not self.batch.admitted and not self.cmd.preempt


class Runner:
    def __init__(self, workload: Workload, placement: Placement, policy: BatchingPolicy,
                 specs: dict[str, ModelSpec], config: RunnerConfig | None = None) -> None:
        self.workload, self.placement, self.policy, self.specs = workload, placement, policy, specs
        self.config = config or RunnerConfig()
        self.stats: dict[str, Any] = {"decisions": 0, "steps": 0, "decode_runs": 0, "preemptions": 0, "anomalies": [],
                                      "deferred_launches": 0, "policy": policy.name, "mode": "mixed",
                                      "device": self.config.device}
        self._decide_s: list[float] = []  # wall time of each decision: view, policy, launch, send
        self._decide_cpu_s: list[float] = []  # the same in this thread's CPU time (immune to other load)
        self._step_s: list[float] = []
        self._check_inputs()
        self.writer = RecordWriter(self.config.records_path)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._mps: MPSDaemon | None = None
        self.units: dict[int, RunnerUnit] = {}
        self.workers: list[WorkerHandle] = []  # every engine process this run started
        self._by_conn: dict[Any, Engine] = {}
        self._engines: dict[str, Engine] = {}
        self._deferred: deque[Job] = deque()
        self._t0 = 0.0
        df = workload.df
        self._rows = [df[c].to_numpy() for c in ("request_id", "model", "arrival_s", "prompt_tokens", "output_tokens")]
        self._next_arrival = 0

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
        if self.config.device == "cpu" and any(x.tp > 1 for u in self.placement.units for x in u.llms):
            raise RunnerError("tensor parallelism > 1 is not supported by the CPU runner (one process per LLM)")

    def _work_dir(self) -> Path:
        if self.config.work_dir is not None:
            path = Path(self.config.work_dir)
            path.mkdir(parents=True, exist_ok=True)
            return path
        self._tmp = tempfile.TemporaryDirectory(prefix="muxsim-hwloop-")
        return Path(self._tmp.name)

    def _gpu_cores(self) -> dict[int, tuple[int, ...]]:
        if self.config.gpu_cores is not None:
            return self.config.gpu_cores
        gpus = sorted({g for u in self.placement.units for g in u.gpus})
        cores = available_cores()
        if len(cores) < len(gpus):
            raise RunnerError(f"placement uses {len(gpus)} GPU indices but only {len(cores)} CPU cores "
                              f"are available to stand in for them")
        per = len(cores) // len(gpus)
        return {g: cores[i * per:(i + 1) * per] for i, g in enumerate(gpus)}

    def _slices(self, unit: Unit) -> list[Slice]:
        if self.config.device == "cpu":
            table = self._gpu_cores()
            cores = [c for g in unit.gpus for c in table[g]]
            return cpu_slices(unit.llms, self.policy.exclusive, cores)
        return cuda_slices(unit.llms, self.policy.exclusive, unit.gpus, self._mps)

    def _build(self, work: Path) -> list[WorkerHandle]:
        prefill_tokens = int(getattr(self.policy, "max_prefill_tokens", 0))
        if self.config.device == "cuda" and self.config.use_mps:
            self._mps = MPSDaemon(work / "mps")
            self._mps.start()
        per_gpu: dict[int, int] = {}
        for u in self.placement.units:
            for g in u.gpus:
                per_gpu[g] = per_gpu.get(g, 0) + len(u.llms)
        handles = []
        chunks = {m: blocks_per_chunk(spec) for m, spec in self.specs.items()}
        for unit in self.placement.units:
            for x, sl in zip(unit.llms, self._slices(unit), strict=True):
                spec = self.specs[x.model]
                real = self.config.model_dirs.get(x.model)
                folder = real or write_model_dir(spec, work / "models")
                cfg = engine_config(spec, folder, max_batch=x.max_batch, pool_blocks=unit.kv_blocks,
                                    chunk_blocks=chunks[x.model], prefill_tokens=prefill_tokens, dummy=real is None,
                                    max_model_len=self.config.max_model_len)
                if self.config.device == "cuda":
                    share = self.config.cuda_memory_fraction or 0.9 / max(per_gpu[g] for g in unit.gpus)
                    cfg = replace(cfg, gpu_memory_utilization=share)
                handle = WorkerHandle(WorkerSpec(x.name, cfg, sl.cores, sl.env), work / "logs" / f"{x.name}.log",
                                      unit=unit.unit_id)
                handles.append(handle)
                self._engines[x.name] = Engine(x.name, unit.unit_id, sl, handle)
            ledger = UnitLedger(unit, self.specs, chunks, "mixed", self.policy.exclusive, self.writer)
            self.units[unit.unit_id] = RunnerUnit(ledger)
        return handles

    # ---- top level ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        failure = "run interrupted"
        try:
            with _sigterm_raises():
                work = self._work_dir()
                handles = self.workers = self._build(work)
                t = time.monotonic()
                readies = start_workers(handles, self.config.startup_timeout_s)
                self.stats["startup_s"] = time.monotonic() - t
                self.stats["workers"] = {h.name: {"pid": r.pid, "cores": list(r.cores), "import_s": r.import_s,
                                                  "build_s": r.build_s, "torch_threads": r.torch_threads,
                                                  "share_pct": self._engines[h.name].slice.share_pct}
                                         for h, r in zip(handles, readies, strict=True)}
                self.stats["versions"] = readies[0].versions if readies else {}
                self._replay()
                failure = ""
        except WorkerError as e:
            failure = f"worker failed: {str(e).splitlines()[0]}"
            raise
        except KeyboardInterrupt:
            failure = "run interrupted (SIGINT)"
            raise
        except Interrupted:
            failure = "run interrupted (SIGTERM)"
            raise
        except Exception as e:
            failure = f"runner error: {e}"
            raise
        finally:
            try:
                if failure:
                    self._fail_leftovers(failure)
            finally:
                self._shutdown(self.workers)
        return self._result()

    def _shutdown(self, handles: list[WorkerHandle]) -> None:
        """Every child reaped, the MPS daemon stopped and the records file closed, whatever happened."""
        try:
            for h in handles:
                h.stop()
        finally:
            try:
                if self._mps is not None:
                    self._mps.stop()
            finally:
                self._records = self.writer.close()
                if self._tmp is not None:
                    self._tmp.cleanup()

    def _result(self) -> RunResult:
        self.stats["records"] = self.writer.count
        self.stats["preemptions"] = sum(u.ledger.preemptions for u in self.units.values())
        self.stats["decide_ms"] = _summary(self._decide_s, 1e3)
        self.stats["decide_cpu_ms"] = _summary(self._decide_cpu_s, 1e3)
        self.stats["step_ms"] = _summary(self._step_s, 1e3)
        path = Path(self.config.records_path) if self.config.records_path else None
        return RunResult(self._records, path, self.stats)

    def _now(self) -> float:
        return time.monotonic() - self._t0

    # ---- the replay loop ------------------------------------------------------------------------
    def _replay(self) -> None:
        arrivals = self._rows[2]
        horizon = self.config.horizon_s if self.config.horizon_s is not None else math.inf
        period = self.policy.quota_period_s
        self._t0 = time.monotonic()
        cpu0 = time.process_time()
        try:
            self._loop(arrivals, horizon, period)
        finally:
            self.stats["replay_s"] = self._now()
            self.stats["runner_cpu_s"] = time.process_time() - cpu0

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
                self._arrive(self._next_arrival)
                self._next_arrival += 1
            for unit in self.units.values():
                if unit.next_tick <= now:
                    self._set_quotas(unit)
                    unit.next_tick += period
                    unit.dirty = True
            for unit in self.units.values():
                if unit.dirty and not self._yield_runs(unit):
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
            busy = [*self._by_conn]
            timeout = max(0.0, wake - self._now())
            if busy:
                for conn in mpc.wait(busy, timeout=min(timeout, self.config.step_timeout_s)):
                    self._step_done(self._by_conn[conn])
                self._check_hung()
            elif timeout > 0:
                time.sleep(timeout)

    def _check_hung(self) -> None:
        late = [x for x in self._by_conn.values()
                if x.job and time.monotonic() - x.job.t_sent > self.config.step_timeout_s]
        if late:
            names = ", ".join(x.worker.describe() for x in late)
            raise WorkerError(f"no step result from {names} within step_timeout_s={self.config.step_timeout_s:g} s")

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

    def _arrive(self, i: int) -> None:
        rid, name, t, prompt, output = (col[i] for col in self._rows)
        engine = self._engines[str(name)]
        unit = self.units[engine.unit_id]
        r = Request(int(rid), str(name), float(t), int(prompt), int(output))
        if unit.ledger.arrive(r, engine.worker.spec.engine.max_model_len):  # the engine's limit, not the model's
            unit.dirty = True

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
        if self.config.decode_runs and len(jobs) == 1 and jobs[0].decode_only and self._alone(unit):
            self._plan_run(unit, jobs[0])
        for job in jobs:
            self._dispatch(job)
        self._decide_s.append(time.perf_counter() - t)
        self._decide_cpu_s.append(time.thread_time() - cpu)
        self.stats["decisions"] += 1

    def _start(self, unit: RunnerUnit, launch: Launch) -> Job:
        """Check a launch against the engine's rules, then apply it to the unit's ledger (which
        checks it against the unit's budgets)."""
        name = self.policy.name
        engine = self._engines[launch.llm] if launch.llm in unit.ledger.llms else None
        if engine is not None:  # else the ledger says the LLM is not on this unit
            if launch.phase != "mixed":
                raise RunnerError(f"policy {name} launched a {launch.phase!r} job; stock vLLM engines only run "
                                  f"'mixed' steps (give the policy view mode 'mixed')")
            if min(100, launch.sm_units * SM_UNIT_PCT) != engine.slice.share_pct:
                raise RunnerError(f"policy {name} launched {engine.name} at {launch.sm_units * SM_UNIT_PCT}% but "
                                  f"its worker was started at {engine.slice.share_pct}% (a process's share is fixed)")
        try:
            batch = unit.ledger.apply(launch, name)
        except LedgerError as e:
            raise RunnerError(str(e)) from e
        assert engine is not None  # the ledger knows every LLM of the unit
        llm = batch.llm
        if batch.decoding != len(llm.running):
            left = sorted({r.request_id for r in llm.running} - set(launch.request_ids))[:5]
            raise RunnerError(f"policy {name} left running request(s) {left} of {llm.name} out of a step; "
                              f"a vLLM step decodes every request in its engine")
        admitted = batch.requests[: batch.admitted]
        cmd = StepCmd(tuple(Admit(r.request_id, r.prompt_tokens, r.context_tokens, r.remaining_tokens)
                            for r in admitted), tuple(launch.preempt))
        job = Job(engine, batch, cmd, self._now())
        engine.job = job
        return job

    @staticmethod
    def _alone(unit: RunnerUnit) -> bool:
        """Is the one job just launched all the unit has to do? Then its decode may repeat as is
        (`UnitLedger.idle_work`)."""
        ledger = unit.ledger
        return len(ledger.batches) == 1 and not ledger.idle_work()

    def _plan_run(self, unit: RunnerUnit, job: Job) -> None:
        """How many steps a decode run may take: until its first request finishes, and as long as
        its KV growth fits the slack (its first step's blocks are charged already)."""
        batch = job.batch
        contexts = [r.context_tokens for r in batch.requests]
        left = [r.remaining_tokens for r in batch.requests]
        steps = steps_within_kv(contexts, left, batch.min_left, unit.ledger.slack(batch.llm) // batch.llm.chunk_blocks)
        if steps > 1:
            job.cmd = replace(job.cmd, max_steps=steps)

    def _yield_runs(self, unit: RunnerUnit) -> bool:
        """Ask the unit's decode runs to stop at their next step boundary; True if any is running."""
        running = False
        for name in unit.ledger.llms:
            engine = self._engines[name]
            job = engine.job
            if job is None or job.cmd.max_steps == 1:
                continue
            if not job.dispatched:
                job.cmd = replace(job.cmd, max_steps=1)
            elif not job.yielded:
                job.yielded = True
                engine.worker.send(Yield())
            running = running or job.dispatched
        return running

    def _dispatch(self, job: Job) -> None:
        """Send the step now, or defer it while another engine runs on any of its cores.

        A deferred launch also waits behind older deferred launches on the same cores, so none starves.
        """
        if self._must_wait(job):
            self._deferred.append(job)
            self.stats["deferred_launches"] += 1
        else:
            self._send(job)

    def _must_wait(self, job: Job) -> bool:
        cores = job.engine.slice.cores
        if not cores:
            return False  # GPU: MPS shares the SMs, nothing to serialise
        running = any(overlapping(cores, x.slice.cores) for x in self._by_conn.values())
        return running or any(overlapping(cores, j.engine.slice.cores) for j in self._deferred)

    def _send(self, job: Job) -> None:
        job.dispatched = True
        job.t_sent = time.monotonic()
        job.engine.worker.send(job.cmd)
        assert job.engine.worker.conn is not None
        self._by_conn[job.engine.worker.conn] = job.engine

    def _release_deferred(self) -> None:
        """Start deferred launches, oldest first, as far as their cores are now free."""
        deferred, self._deferred = self._deferred, deque()
        for job in deferred:
            if self._must_wait(job):
                self._deferred.append(job)
            else:
                self._send(job)

    def _step_done(self, engine: Engine) -> None:
        reply: StepDone = engine.worker.recv(what="a step result")
        job = engine.job
        assert engine.worker.conn is not None and job is not None
        del self._by_conn[engine.worker.conn]
        steps = reply.steps
        self.stats["steps"] += steps
        self.stats["decode_runs"] += steps > 1
        self._step_s.extend(reply.step_s)
        self._check_step(engine, job, reply)
        engine.job = None
        ledger = self.units[engine.unit_id].ledger
        ledger.hold_for_steps(job.batch, steps)
        ledger.end(job.batch, steps, reply.t_first_end - self._t0, reply.t_end - self._t0)
        self.units[engine.unit_id].dirty = True
        self._release_deferred()

    def _check_step(self, engine: Engine, job: Job, reply: StepDone) -> None:
        """Did the engine do exactly what was launched: one token per request, the right ones done?

        Checked before any state changes, so a strict stop still records the step's requests.
        """
        anomalies = list(reply.anomalies)
        steps = reply.steps
        if not 1 <= steps <= job.cmd.max_steps:
            anomalies.append(f"ran {steps} steps, launched for at most {job.cmd.max_steps}")
        for r in job.batch.requests:
            if reply.tokens.get(r.request_id, 0) != steps:
                anomalies.append(f"request {r.request_id} got {reply.tokens.get(r.request_id, 0)} tokens "
                                 f"in {steps} step(s)")
        expected = {r.request_id for r in job.batch.requests if r.remaining_tokens <= steps}
        if expected != set(reply.finished):
            anomalies.append(f"engine finished {sorted(reply.finished)}, runner expected {sorted(expected)}")
        if anomalies:
            self.stats["anomalies"].extend(f"{engine.name}: {a}" for a in anomalies)
            if self.config.strict:
                raise RunnerError(f"engine of {engine.name} deviated from its launch: {'; '.join(anomalies[:3])}")

    # ---- records --------------------------------------------------------------------------------
    def _fail_leftovers(self, why: str) -> None:
        """Every request not finished is recorded once as failed with `why`; nothing is dropped."""
        for unit in self.units.values():
            unit.ledger.fail_leftovers(why)
        for engine in self._engines.values():
            engine.job = None
        for i in range(self._next_arrival, len(self._rows[0])):
            rid, name, t, prompt, output = (col[i] for col in self._rows)
            ledger = self.units[self._engines[str(name)].unit_id].ledger
            ledger.fail(Request(int(rid), str(name), float(t), int(prompt), int(output)), not_arrived(why, float(t)))
        self._next_arrival = len(self._rows[0])


def run(workload: Workload, placement: Placement, policy: BatchingPolicy, specs: dict[str, ModelSpec],
        **config: Any) -> RunResult:
    """Replay `workload` on real engines; keyword arguments are `RunnerConfig` fields."""
    return Runner(workload, placement, policy, specs, RunnerConfig(**config)).run()


def _summary(values: list[float], scale: float) -> dict[str, float]:
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
        raise Interrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
