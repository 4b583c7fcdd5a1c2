"""The hardware runner: replays a Workload in wall-clock time on real vLLM engines.

It executes the same `Placement` and `BatchingPolicy` objects as the simulator and writes the same
request records (`policies.records`), so a run here and a simulation can be compared row for row.

Execution semantics ("mixed" mode, the only one a stock vLLM engine can run):
- One worker process per placed LLM, pinned to a slice of its unit (`hwloop.partition`) at the
  share it will be launched with, fixed for the whole run (`worker_share_pct`).
- The runner owns every `Request` (tokens generated, KV blocks held, first-token time,
  preemptions) and the unit's SM units and KV pool, exactly as the simulator does; the policy sees
  them through a `UnitView` and is asked to decide after every change: an arrival, a step's end,
  a quota tick (`policy.quotas` at start and every `quota_period_s`).
- A `Launch(phase="mixed", request_ids=new admissions + running requests)` means: add the newly
  admitted requests to that LLM's engine and run exactly one engine step. That step prefills the
  new requests (each gets its first token) and decodes every running one (one token each). Since a
  vLLM step always decodes every request its engine holds, a launch must name all of the LLM's
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
- Requests that cannot be served (longer than the model's context, or needing more KV blocks than
  the unit's pool) fail on arrival with a reason; nothing is dropped. On a worker crash, Ctrl-C or
  SIGTERM every request not finished is recorded as failed with the cause, the records file is
  closed, every worker is reaped and the MPS daemon (if started) stopped; then the error is raised.
"""

from __future__ import annotations

import bisect
import math
import multiprocessing.connection as mpc
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
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
from policies.placement import (
    BLOCK_TOKENS,
    SM_UNIT_PCT,
    LLMPlacement,
    Placement,
    Unit,
    blocks_for_tokens,
    blocks_per_chunk,
)
from policies.records import RecordWriter
from policies.specs import ModelSpec
from policies.view import (
    BatchingPolicy,
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
class LLMState:
    placement: LLMPlacement
    spec: ModelSpec
    chunk_blocks: int
    unit_id: int
    slice: Slice
    worker: WorkerHandle
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)  # oldest first; all of them in the engine
    busy: bool = False
    kv_used: int = 0
    kv_quota: int = 0
    idle_since: float = -1.0
    job: Job | None = None

    @property
    def name(self) -> str:
        return self.placement.name

    def view(self) -> LLMView:
        # One engine per LLM: its "prefill" and "decode" processes are the same, busy together.
        return LLMView(self.placement, self.chunk_blocks, ReadOnlyQueue(self.waiting),
                       ReadOnlyQueue(self.running), self.busy, self.busy, self.kv_used, self.kv_quota,
                       self.idle_since, self.idle_since)


@dataclass(eq=False)
class UnitState:
    unit: Unit
    llms: dict[str, LLMState]
    sm_free: int
    kv_free: int
    next_tick: float = math.inf
    dirty: bool = True

    def busy(self) -> bool:
        return any(x.busy for x in self.llms.values())

    def view(self, now: float) -> UnitView:
        return UnitView(self.unit.unit_id, now, "mixed", self.unit.sm_units, self.sm_free,
                        self.unit.kv_blocks, self.kv_free, tuple(x.view() for x in self.llms.values()))


@dataclass(eq=False)
class Job:
    llm: LLMState
    admitted: list[Request]
    batch: list[Request]  # admitted + decoding, in launch order
    sm_units: int
    cmd: StepCmd
    t_launch: float
    dispatched: bool = False
    t_sent: float = math.inf  # monotonic time the step (or run) was sent to the worker
    yielded: bool = False

    @property
    def decode_only(self) -> bool:
        return not self.admitted and not self.cmd.preempt


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
        self.units: dict[int, UnitState] = {}
        self.workers: list[WorkerHandle] = []  # every engine process this run started
        self._by_conn: dict[Any, LLMState] = {}
        self._llms: dict[str, LLMState] = {}
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
        for unit in self.placement.units:
            llms = {}
            for x, sl in zip(unit.llms, self._slices(unit), strict=True):
                spec = self.specs[x.model]
                chunk = blocks_per_chunk(spec)
                real = self.config.model_dirs.get(x.model)
                folder = real or write_model_dir(spec, work / "models")
                cfg = engine_config(spec, folder, max_batch=x.max_batch, pool_blocks=unit.kv_blocks,
                                    chunk_blocks=chunk, prefill_tokens=prefill_tokens, dummy=real is None,
                                    max_model_len=self.config.max_model_len)
                if self.config.device == "cuda":
                    share = self.config.cuda_memory_fraction or 0.9 / max(per_gpu[g] for g in unit.gpus)
                    cfg = replace(cfg, gpu_memory_utilization=share)
                handle = WorkerHandle(WorkerSpec(x.name, cfg, sl.cores, sl.env), work / "logs" / f"{x.name}.log",
                                      unit=unit.unit_id)
                handles.append(handle)
                llms[x.name] = self._llms[x.name] = LLMState(x, spec, chunk, unit.unit_id, sl, handle)
            self.units[unit.unit_id] = UnitState(unit, llms, unit.sm_units, unit.kv_blocks)
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
                                                  "share_pct": self._llms[h.name].slice.share_pct}
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
        for us in self.units.values():
            self._set_quotas(us)
            us.next_tick = period if period > 0 else math.inf
        next_flush = self.config.flush_every_s
        next_progress = 0.0
        while True:
            now = self._now()
            if now >= horizon:
                self._fail_leftovers(f"not finished by horizon {horizon:g}s")
                return
            while self._next_arrival < len(arrivals) and arrivals[self._next_arrival] <= now:
                self._arrive(self._next_arrival)
                self._next_arrival += 1
            for us in self.units.values():
                if us.next_tick <= now:
                    self._set_quotas(us)
                    us.next_tick += period
                    us.dirty = True
            for us in self.units.values():
                if us.dirty and not self._yield_runs(us):
                    self._decide(us)
            if now >= next_flush:
                self.writer.flush()
                next_flush = now + self.config.flush_every_s
            if self.config.progress and now >= next_progress:
                self.config.progress(now)
                next_progress = now + 1.0
            if not self._by_conn and self._next_arrival == len(arrivals):
                if self._all_done():
                    return
                if not self._unstick():
                    self._fail_leftovers("never scheduled (stuck: no KV room)")
                    return
            wake = min(float(arrivals[self._next_arrival]) if self._next_arrival < len(arrivals) else math.inf,
                       min(us.next_tick for us in self.units.values()), horizon, next_flush,
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

    def _all_done(self) -> bool:
        return not any(x.waiting or x.running for x in self._llms.values())

    def _unstick(self) -> bool:
        """Nothing runs, nothing will arrive, requests wait: can a new KV quota let one in?"""
        changed = False
        for us in self.units.values():
            before = {n: x.kv_quota for n, x in us.llms.items()}
            self._set_quotas(us)
            if any(before[n] != x.kv_quota for n, x in us.llms.items()):
                changed = us.dirty = True
        if changed:
            for us in self.units.values():
                if us.dirty:
                    self._decide(us)
        return bool(self._by_conn)

    def _arrive(self, i: int) -> None:
        rid, name, t, prompt, output = (col[i] for col in self._rows)
        llm = self._llms[str(name)]
        us = self.units[llm.unit_id]
        r = Request(int(rid), str(name), float(t), int(prompt), int(output))
        total = r.prompt_tokens + r.output_tokens
        limit = llm.worker.spec.engine.max_model_len
        need = blocks_for_tokens(total, llm.chunk_blocks)
        if total > limit:
            self._record(us, r, "failed", f"prompt+output {total} tokens exceeds {llm.spec.name} "
                                          f"context {limit}")
        elif need > us.unit.kv_blocks:
            self._record(us, r, "failed", f"needs {need} KV blocks, unit pool has {us.unit.kv_blocks}")
        else:
            llm.waiting.append(r)
            us.dirty = True

    def _set_quotas(self, us: UnitState) -> None:
        quotas = self.policy.quotas(us.view(self._now()))
        if not self.policy.exclusive and sum(quotas.values()) > us.unit.kv_blocks:
            raise RunnerError(f"unit {us.unit.unit_id}: policy {self.policy.name} set KV quotas summing to "
                              f"{sum(quotas.values())} > pool {us.unit.kv_blocks}")
        for name, q in quotas.items():
            us.llms[name].kv_quota = q

    # ---- decisions and launches -----------------------------------------------------------------
    def _decide(self, us: UnitState) -> None:
        us.dirty = False
        if self.policy.exclusive and us.busy():
            return
        t, cpu = time.perf_counter(), time.thread_time()
        launches = self.policy.decide(us.view(self._now()))
        if self.policy.exclusive and len(launches) > 1:
            raise RunnerError(f"exclusive policy {self.policy.name} launched {len(launches)} jobs at once "
                              f"on unit {us.unit.unit_id}")
        jobs = [self._start(us, launch) for launch in launches]
        if self.config.decode_runs and len(jobs) == 1 and jobs[0].decode_only and self._alone(us, jobs[0].llm):
            self._plan_run(us, jobs[0])
        for job in jobs:
            self._dispatch(job)
        self._decide_s.append(time.perf_counter() - t)
        self._decide_cpu_s.append(time.thread_time() - cpu)
        self.stats["decisions"] += 1

    def _start(self, us: UnitState, launch: Launch) -> Job:
        """Check a launch against the unit's budgets and the engine's rules, then apply it."""
        name = self.policy.name
        llm = us.llms.get(launch.llm)
        if llm is None:
            raise RunnerError(f"policy {name} launched {launch.llm!r}, which is not on unit {us.unit.unit_id}")
        if launch.phase != "mixed":
            raise RunnerError(f"policy {name} launched a {launch.phase!r} job; stock vLLM engines only run "
                              f"'mixed' steps (give the policy view mode 'mixed')")
        if launch.sm_units > us.sm_free:
            raise RunnerError(f"policy {name} over-committed SM units on unit {us.unit.unit_id}: "
                              f"{launch.sm_units} asked, {us.sm_free} free")
        if llm.busy:
            raise RunnerError(f"policy {name} launched {llm.name} while its engine is busy")
        if min(100, launch.sm_units * SM_UNIT_PCT) != llm.slice.share_pct:
            raise RunnerError(f"policy {name} launched {llm.name} at {launch.sm_units * SM_UNIT_PCT}% but its "
                              f"worker was started at {llm.slice.share_pct}% (a process's share is fixed)")
        for rid in launch.preempt:
            self._preempt(us, llm, rid)
        ids = set(launch.request_ids)
        admitted = take_waiting(llm.waiting, ids)
        decoding = [r for r in llm.running if r.request_id in ids]
        if len(admitted) + len(decoding) != len(ids):
            raise RunnerError(f"policy {name} launched unknown request(s) for {llm.name}: "
                              f"{sorted(ids - {r.request_id for r in admitted + decoding})[:5]}")
        if len(decoding) != len(llm.running):
            left = sorted({r.request_id for r in llm.running} - ids)[:5]
            raise RunnerError(f"policy {name} left running request(s) {left} of {llm.name} out of a step; "
                              f"a vLLM step decodes every request its engine holds")
        batch = admitted + decoding
        taken = hold(batch, llm.chunk_blocks)
        if taken > min(llm.kv_quota - llm.kv_used, us.kv_free):
            raise RunnerError(f"policy {name} over-committed KV blocks on unit {us.unit.unit_id}: "
                              f"{llm.name} needs {taken}, quota slack {llm.kv_quota - llm.kv_used}, "
                              f"pool free {us.kv_free}")
        llm.kv_used += taken
        us.kv_free -= taken
        us.sm_free -= launch.sm_units
        llm.busy = True
        cmd = StepCmd(tuple(Admit(r.request_id, r.prompt_tokens, r.context_tokens, r.remaining_tokens)
                            for r in admitted), tuple(launch.preempt))
        job = Job(llm, admitted, batch, launch.sm_units, cmd, self._now())
        llm.job = job
        return job

    def _alone(self, us: UnitState, llm: LLMState) -> bool:
        """Is `llm` the only engine on the unit with anything to do? Then its decode may repeat as is."""
        for other in us.llms.values():
            if other is llm:
                continue
            if other.busy or other.running:
                return False
            if other.placement.max_batch > 0 and head_fits(other.waiting, other.chunk_blocks,
                                                           min(other.kv_quota - other.kv_used, us.kv_free)):
                return False
        return True

    def _plan_run(self, us: UnitState, job: Job) -> None:
        """How many steps a decode run may take: until its first request finishes, and as long as
        its KV growth fits the slack (its first step's blocks are charged already)."""
        llm = job.llm
        slack = min(llm.kv_quota - llm.kv_used, us.kv_free)
        steps = decode_run_length([r.context_tokens for r in job.batch],
                                  min(r.remaining_tokens for r in job.batch), slack // llm.chunk_blocks)
        if steps > 1:
            job.cmd = replace(job.cmd, max_steps=steps)

    def _yield_runs(self, us: UnitState) -> bool:
        """Ask the unit's decode runs to stop at their next step boundary; True if any is running."""
        held = False
        for llm in us.llms.values():
            job = llm.job
            if job is None or job.cmd.max_steps == 1:
                continue
            if not job.dispatched:
                job.cmd = replace(job.cmd, max_steps=1)
            elif not job.yielded:
                job.yielded = True
                llm.worker.send(Yield())
            held = held or job.dispatched
        return held

    def _preempt(self, us: UnitState, llm: LLMState, rid: int) -> None:
        r = next((r for r in llm.running if r.request_id == rid), None)
        if r is None:
            raise RunnerError(f"policy {self.policy.name} preempted request {rid}, not running on {llm.name}")
        llm.running.remove(r)
        freed = requeue_preempted(llm.waiting, r)
        llm.kv_used -= freed
        us.kv_free += freed
        self.stats["preemptions"] += 1

    def _dispatch(self, job: Job) -> None:
        """Send the step now, or hold it while another engine runs on any of its cores.

        A held launch also waits behind older held launches on the same cores, so none starves.
        """
        if self._must_wait(job):
            self._deferred.append(job)
            self.stats["deferred_launches"] += 1
        else:
            self._send(job)

    def _must_wait(self, job: Job) -> bool:
        cores = job.llm.slice.cores
        if not cores:
            return False  # GPU: MPS shares the SMs, nothing to serialise
        running = any(overlapping(cores, x.slice.cores) for x in self._by_conn.values())
        return running or any(overlapping(cores, j.llm.slice.cores) for j in self._deferred)

    def _send(self, job: Job) -> None:
        job.dispatched = True
        job.t_sent = time.monotonic()
        job.llm.worker.send(job.cmd)
        assert job.llm.worker.conn is not None
        self._by_conn[job.llm.worker.conn] = job.llm

    def _release_deferred(self) -> None:
        """Start held launches, oldest first, as far as their cores are now free."""
        held, self._deferred = self._deferred, deque()
        for job in held:
            if self._must_wait(job):
                self._deferred.append(job)
            else:
                self._send(job)

    def _step_done(self, llm: LLMState) -> None:
        reply: StepDone = llm.worker.recv(what="a step result")
        job = llm.job
        assert llm.worker.conn is not None and job is not None
        del self._by_conn[llm.worker.conn]
        steps = reply.steps
        self.stats["steps"] += steps
        self.stats["decode_runs"] += steps > 1
        self._step_s.extend(reply.step_s)
        self._check_step(llm, job, reply)
        llm.job = None
        us = self.units[llm.unit_id]
        t_end = reply.t_end - self._t0
        for r in job.batch:
            r.generated += steps
            r.busy = False
            if math.isnan(r.first_token_s):
                r.first_token_s = reply.t_first_end - self._t0
            if steps > 1:  # the blocks its last step held; the first step's were charged at launch
                grown = blocks_for_tokens(r.context_tokens - 1, llm.chunk_blocks) - r.blocks
                r.blocks += grown
                llm.kv_used += grown
                us.kv_free -= grown
        for r in job.admitted:
            bisect.insort(llm.running, r, key=age)
        done = [r for r in job.batch if r.remaining_tokens <= 0]
        if done:
            llm.running = [r for r in llm.running if r.remaining_tokens > 0]
            for r in done:
                llm.kv_used -= r.blocks
                us.kv_free += r.blocks
                r.blocks = 0
                self._record(us, r, "finished", finish_s=t_end)
        us.sm_free += job.sm_units
        llm.busy = False
        llm.idle_since = t_end
        us.dirty = True
        self._release_deferred()

    def _check_step(self, llm: LLMState, job: Job, reply: StepDone) -> None:
        """Did the engine do exactly what was launched: one token per request, the right ones done?

        Checked before any state changes, so a strict stop still records the step's requests.
        """
        anomalies = list(reply.anomalies)
        steps = reply.steps
        if not 1 <= steps <= job.cmd.max_steps:
            anomalies.append(f"ran {steps} steps, launched for at most {job.cmd.max_steps}")
        for r in job.batch:
            if reply.tokens.get(r.request_id, 0) != steps:
                anomalies.append(f"request {r.request_id} got {reply.tokens.get(r.request_id, 0)} tokens "
                                 f"in {steps} step(s)")
        expected = {r.request_id for r in job.batch if r.remaining_tokens <= steps}
        if expected != set(reply.finished):
            anomalies.append(f"engine finished {sorted(reply.finished)}, runner expected {sorted(expected)}")
        if anomalies:
            self.stats["anomalies"].extend(f"{llm.name}: {a}" for a in anomalies)
            if self.config.strict:
                raise RunnerError(f"engine of {llm.name} deviated from its launch: {'; '.join(anomalies[:3])}")

    # ---- records --------------------------------------------------------------------------------
    def _record(self, us: UnitState, r: Request, status: str, reason: str = "", finish_s: float = math.nan) -> None:
        self.writer.add(r.request_id, r.llm, us.unit.unit_id, r.arrival_s, r.first_token_s, finish_s,
                        r.prompt_tokens, r.output_tokens, r.preemptions, status, reason)

    def _fail_leftovers(self, why: str) -> None:
        """Every request not finished is recorded once as failed with `why`; nothing is dropped."""
        for us in self.units.values():
            for llm in us.llms.values():
                for r in [*llm.waiting, *llm.running, *(llm.job.admitted if llm.job else ())]:
                    self._record(us, r, "failed", why)
                llm.waiting.clear()
                llm.running.clear()
                llm.job = None
        for i in range(self._next_arrival, len(self._rows[0])):
            rid, name, t, prompt, output = (col[i] for col in self._rows)
            llm = self._llms[str(name)]
            self._record(self.units[llm.unit_id], Request(int(rid), str(name), float(t), int(prompt), int(output)),
                         "failed", f"{why}; arrives at {float(t):g}s, after the replay stopped")
        self._next_arrival = len(self._rows[0])


def run(workload: Workload, placement: Placement, policy: BatchingPolicy, specs: dict[str, ModelSpec],
        **config: Any) -> RunResult:
    """Replay `workload` on real engines; keyword arguments are `RunnerConfig` fields."""
    return Runner(workload, placement, policy, specs, RunnerConfig(**config)).run()


def decode_run_length(contexts: Sequence[int], max_steps: int, chunks: int) -> int:
    """Steps a decode batch can take, at most `max_steps`, growing by at most `chunks` new KV chunks.

    Step s (0-based; step 0's blocks are already held) computes context c + s, which needs a new
    chunk for a request when it enters a new block: at s ≡ 1 - c (mod BLOCK_TOKENS), s ≥ 1.
    """
    first = [(1 - c) % BLOCK_TOKENS or BLOCK_TOKENS for c in contexts]
    crossings = sorted(f + BLOCK_TOKENS * m for f in first for m in range(max_steps // BLOCK_TOKENS + 1)
                       if f + BLOCK_TOKENS * m < max_steps)
    return crossings[chunks] if len(crossings) > chunks else max_steps


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
