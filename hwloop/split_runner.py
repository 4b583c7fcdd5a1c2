"""The split-mode runner: MuxServe's own execution, replayed in wall-clock time on real engines.

It executes the same `Placement` and `BatchingPolicy` objects as the simulator in "split" mode
and writes the same request records (`policies.records`), so the two compare row for row.

- **Processes**: a prefill worker and a decode worker per placed LLM (`hwloop.split_worker`),
  each pinned to its own core set on CPU, or an MPS client at its own thread percentage on NVIDIA
  (`hwloop.partition.split_cpu_slices` / `split_cuda_slices`), at the share the policy launches that
  phase with (`split_shares`), fixed for the run. Shares the cores cannot honour (less than one
  whole core) are refused in one line before any process starts.
- **One KV pool per unit** (`hwloop.kv_pool.KVPool`), mapped by every worker of the unit, and its
  block-id allocator, the only owner of the unit's free-block count: the policy's view reads the
  free count from it, and the block ids it hands out are the blocks the engines write. A request
  holds `r.blocks` ids, in the order of its block table.
- **Launches**: ADBS's split launches, as in the simulator: `Launch(phase="prefill")` sends the
  admitted requests' contexts and block tables to the LLM's prefill worker, which writes their KV
  and returns each one's first token; `Launch(phase="decode")` sends the token to feed, the length
  and the block table of each request to the decode worker. The handoff is the block table: the
  decode worker reads the blocks the prefill worker wrote. Prefills and decodes of different LLMs
  run at once, and so do the prefill and the decode of one LLM (on different requests).
- **Preemption** by recompute, as in the simulator: the request's blocks go back to the pool and
  its whole context (prompt and generated tokens, which the runner keeps) is prefilled again later.
- **Decode runs** (the simulator's step skipping): when no idle process on the unit could start
  anything, the policy would relaunch the same decode at every step boundary, so the worker repeats
  it without a round trip, with the blocks of the run's steps taken at launch (within the KV slack).
  Any change on the unit (an arrival, a quota tick, another job's end) sends a `Yield`, which ends
  the run after its current step, and the policy decides at once, seeing the run's decode as busy,
  as the simulator's policy sees a run in progress; the blocks of the steps not taken go back to
  the pool when the run ends. Workers whose core sets overlap take turns
  (`stats["deferred_launches"]`); no run starts while a launch on the unit waits for cores.
- **Crash safety**: a killed worker, Ctrl-C or SIGTERM records every unfinished request as failed
  with the cause, returns every block to the pool (`stats["kv_free_end"]` = total), closes the
  records file, reaps every worker and stops the MPS daemon. The pools are memfds (no name in
  /dev/shm), freed by the kernel when the last process mapping them is gone.
"""

from __future__ import annotations

import bisect
import math
import multiprocessing.connection as mpc
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwloop.engine import synthetic_prompt
from hwloop.kv_pool import BlockAllocator, KVPool, PoolError, check_fits
from hwloop.partition import (
    MPSDaemon,
    PartitionError,
    Slice,
    available_cores,
    overlapping,
    split_cpu_slices,
    split_cuda_slices,
)
from hwloop.runner import (
    Interrupted,
    RunnerConfig,
    RunnerError,
    RunResult,
    _sigterm_raises,
    _summary,
    decode_run_length,
)
from hwloop.split_worker import (
    DecodeCmd,
    DecodeItem,
    PhaseDone,
    PrefillCmd,
    PrefillItem,
    SplitWorkerHandle,
    SplitWorkerSpec,
)
from hwloop.worker import WorkerError, Yield, start_workers
from policies.placement import (
    BLOCK_BYTES,
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

DTYPE_OF_BYTES = {2: "bfloat16", 4: "float32"}


@dataclass(eq=False)
class Proc:
    """One worker process of an LLM (its prefill or its decode) and the job it runs, if any."""

    phase: str
    slice: Slice
    worker: SplitWorkerHandle
    job: Job | None = None
    idle_since: float = -1.0

    @property
    def busy(self) -> bool:
        return self.job is not None


@dataclass(eq=False)
class LLMState:
    placement: LLMPlacement
    spec: ModelSpec
    chunk_blocks: int
    unit_id: int
    prefill: Proc
    decode: Proc
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)  # hold KV, oldest first; `busy` while in a decode
    kv_used: int = 0
    kv_quota: int = 0
    tokens: dict[int, list[int]] = field(default_factory=dict)  # request id → its context's token ids
    tables: dict[int, list[int]] = field(default_factory=dict)  # request id → its block ids, in table order

    @property
    def name(self) -> str:
        return self.placement.name

    def view(self) -> LLMView:
        return LLMView(self.placement, self.chunk_blocks, ReadOnlyQueue(self.waiting), ReadOnlyQueue(self.running),
                       self.prefill.busy, self.decode.busy, self.kv_used, self.kv_quota,
                       self.prefill.idle_since, self.decode.idle_since)


@dataclass(eq=False)
class UnitState:
    unit: Unit
    llms: dict[str, LLMState]
    sm_free: int
    blocks: BlockAllocator  # the only count of free blocks
    pool: KVPool
    next_tick: float = math.inf
    dirty: bool = True

    def view(self, now: float) -> UnitView:
        return UnitView(self.unit.unit_id, now, "split", self.unit.sm_units, self.sm_free,
                        self.unit.kv_blocks, self.blocks.free, tuple(x.view() for x in self.llms.values()))


@dataclass(eq=False)
class Job:
    llm: LLMState
    proc: Proc
    batch: list[Request]
    sm_units: int
    cmd: PrefillCmd | DecodeCmd
    t_launch: float
    dispatched: bool = False
    t_sent: float = math.inf
    yielded: bool = False

    @property
    def max_steps(self) -> int:
        return self.cmd.max_steps if isinstance(self.cmd, DecodeCmd) else 1


class SplitRunner:
    def __init__(self, workload: Workload, placement: Placement, policy: BatchingPolicy,
                 specs: dict[str, ModelSpec], config: RunnerConfig | None = None) -> None:
        self.workload, self.placement, self.policy, self.specs = workload, placement, policy, specs
        self.config = config or RunnerConfig()
        self.stats: dict[str, Any] = {"decisions": 0, "steps": 0, "prefills": 0, "decode_runs": 0, "preemptions": 0,
                                      "anomalies": [], "deferred_launches": 0,
                                      "sent_beside_own_other_phase": 0, "sent_beside_other_llm": 0, "policy": policy.name, "mode": "split",
                                      "device": self.config.device}
        self._step_s: dict[str, list[float]] = {"prefill": [], "decode": []}
        self.writer: RecordWriter | None = None
        self._slices = self._check_inputs()  # every one-line refusal, before any process or pool exists
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._mps: MPSDaemon | None = None
        self.units: dict[int, UnitState] = {}
        self.workers: list[SplitWorkerHandle] = []
        self._by_conn: dict[Any, tuple[LLMState, Proc]] = {}
        self._llms: dict[str, LLMState] = {}
        self._deferred: deque[Job] = deque()
        self._t0 = 0.0
        df = workload.df
        self._rows = [df[c].to_numpy() for c in ("request_id", "model", "arrival_s", "prompt_tokens", "output_tokens")]
        self._next_arrival = 0
        self.writer = RecordWriter(self.config.records_path)

    # ---- set-up ---------------------------------------------------------------------------------
    def _check_inputs(self) -> dict[int, list[tuple[Slice, Slice]]]:
        placed = self.placement.unit_of()
        missing = [m for m in self.workload.models if m not in placed]
        if missing:
            raise RunnerError(f"LLM(s) {', '.join(missing)} in the workload are placed on no unit "
                              f"(placement '{self.placement.policy}' has {', '.join(placed) or 'none'})")
        unknown = sorted({x.model for u in self.placement.units for x in u.llms} - set(self.specs))
        if unknown:
            raise RunnerError(f"placement uses model type(s) {', '.join(unknown)} with no ModelSpec")
        if any(x.tp > 1 for u in self.placement.units for x in u.llms):
            raise RunnerError("tensor parallelism > 1 is not supported by the split runner (one process per phase)")
        for u in self.placement.units:
            for x in u.llms:
                spec = self.specs[x.model]
                if spec.dtype_bytes not in DTYPE_OF_BYTES:
                    raise RunnerError(f"{x.name} ({spec.name}): dtype_bytes {spec.dtype_bytes} not one of 2, 4")
        if self.config.device == "cuda":
            return {}  # MPS percentages are whatever the shares say; the pool's fit is checked as it is made
        weights = 2 * sum(self.specs[x.model].weight_bytes for u in self.placement.units for x in u.llms)
        pool = sum(u.kv_blocks for u in self.placement.units) * BLOCK_BYTES
        try:
            check_fits(pool + weights, "cpu", "the units' KV pools plus two copies of each LLM's weights")
            return {u.unit_id: split_cpu_slices(u.llms, self.policy.exclusive, self._unit_cores(u))
                    for u in self.placement.units}
        except (PoolError, PartitionError) as e:
            raise RunnerError(str(e)) from None

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

    def _unit_cores(self, unit: Unit) -> list[int]:
        table = self._gpu_cores()
        return [c for g in unit.gpus for c in table[g]]

    def _work_dir(self) -> Path:
        if self.config.work_dir is not None:
            path = Path(self.config.work_dir)
            path.mkdir(parents=True, exist_ok=True)
            return path
        self._tmp = tempfile.TemporaryDirectory(prefix="muxsim-split-")
        return Path(self._tmp.name)

    def _build(self, work: Path) -> list[SplitWorkerHandle]:
        device = self.config.device
        if device == "cuda":
            # The runner allocates the pools, so it is an MPS client of the same daemon as its workers:
            # CUDA IPC works between MPS clients of one server.
            self._mps = MPSDaemon(work / "mps")
            self._mps.start()
            os.environ.update(self._mps.env)
        handles = []
        for unit in self.placement.units:
            pool = KVPool(unit.kv_blocks, device)
            slices = (self._slices[unit.unit_id] if device == "cpu"
                      else split_cuda_slices(unit.llms, self.policy.exclusive, unit.gpus, self._mps))  # type: ignore[arg-type]
            llms = {}
            for x, (pre, dec) in zip(unit.llms, slices, strict=True):
                spec = self.specs[x.model]
                procs = []
                for phase, sl in (("prefill", pre), ("decode", dec)):
                    wspec = SplitWorkerSpec(f"{x.name}/{phase}", x.name, phase, spec, pool.handle(),  # type: ignore[arg-type]
                                            dtype=DTYPE_OF_BYTES[spec.dtype_bytes], device=device,
                                            max_len=self.config.max_model_len or 0, cores=sl.cores, env=sl.env)
                    handle = SplitWorkerHandle(wspec, work / "logs" / f"{x.name}-{phase}.log",  # type: ignore[arg-type]
                                               unit=unit.unit_id)
                    handles.append(handle)
                    procs.append(Proc(phase, sl, handle))
                llms[x.name] = self._llms[x.name] = LLMState(x, spec, blocks_per_chunk(spec), unit.unit_id, *procs)
            self.units[unit.unit_id] = UnitState(unit, llms, unit.sm_units, BlockAllocator(unit.kv_blocks), pool)
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
                self.stats["workers"] = {h.name: {"pid": r.pid, "cores": list(r.cores), "build_s": r.build_s,
                                                  "torch_threads": r.torch_threads,
                                                  "share_pct": self._proc(h).slice.share_pct}
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
                self._shutdown()
        return self._result()

    def _proc(self, handle: SplitWorkerHandle) -> Proc:
        llm = self._llms[handle.spec.llm]
        return llm.prefill if handle.spec.phase == "prefill" else llm.decode

    def _shutdown(self) -> None:
        """Every child reaped, the MPS daemon stopped, the pools and the records file closed, whatever happened."""
        try:
            for h in self.workers:
                h.stop()
        finally:
            try:
                if self._mps is not None:
                    self._mps.stop()
            finally:
                self.stats["kv_free_end"] = {u: us.blocks.free for u, us in self.units.items()}
                self.stats["kv_total"] = {u: us.blocks.total for u, us in self.units.items()}
                for us in self.units.values():
                    us.pool.close()
                assert self.writer is not None
                self._records = self.writer.close()
                if self._tmp is not None:
                    self._tmp.cleanup()

    def _result(self) -> RunResult:
        assert self.writer is not None
        self.stats["records"] = self.writer.count
        self.stats["step_ms"] = _summary(self._step_s["prefill"] + self._step_s["decode"], 1e3)
        self.stats["prefill_ms"] = _summary(self._step_s["prefill"], 1e3)
        self.stats["decode_step_ms"] = _summary(self._step_s["decode"], 1e3)
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
                if us.dirty:
                    self._yield_runs(us)
                    self._decide(us)
            if now >= next_flush:
                assert self.writer is not None
                self.writer.flush()
                next_flush = now + self.config.flush_every_s
            if self.config.progress and now >= next_progress:
                self.config.progress(now)
                next_progress = now + 1.0
            if not self._by_conn and self._next_arrival == len(arrivals):
                if not any(x.waiting or x.running for x in self._llms.values()):
                    return
                if not self._unstick():
                    self._fail_leftovers("never scheduled (stuck: no KV room)")
                    return
            wake = min(float(arrivals[self._next_arrival]) if self._next_arrival < len(arrivals) else math.inf,
                       min(us.next_tick for us in self.units.values()), horizon, next_flush,
                       next_progress if self.config.progress else math.inf)
            timeout = max(0.0, wake - self._now())
            if self._by_conn:
                for conn in mpc.wait([*self._by_conn], timeout=min(timeout, self.config.step_timeout_s)):
                    self._job_done(*self._by_conn[conn])
                self._check_hung()
            elif timeout > 0:
                time.sleep(timeout)

    def _check_hung(self) -> None:
        late = [p for _, p in self._by_conn.values()
                if p.job and time.monotonic() - p.job.t_sent > self.config.step_timeout_s]
        if late:
            names = ", ".join(p.worker.describe() for p in late)
            raise WorkerError(f"no result from {names} within step_timeout_s={self.config.step_timeout_s:g} s")

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
        limit = self.config.max_model_len or llm.spec.max_context
        need = blocks_for_tokens(total, llm.chunk_blocks)
        if total > limit:
            self._record(us, r, "failed", f"prompt+output {total} tokens exceeds {llm.spec.name} context {limit}")
        elif need > us.unit.kv_blocks:
            self._record(us, r, "failed", f"needs {need} KV blocks, unit pool has {us.unit.kv_blocks}")
        else:
            llm.tokens[r.request_id] = synthetic_prompt(r.request_id, r.prompt_tokens, llm.spec.vocab_size)
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
        if self.policy.exclusive and any(x.prefill.busy or x.decode.busy for x in us.llms.values()):
            return
        launches = self.policy.decide(us.view(self._now()))
        if self.policy.exclusive and len(launches) > 1:
            raise RunnerError(f"exclusive policy {self.policy.name} launched {len(launches)} jobs at once "
                              f"on unit {us.unit.unit_id}")
        jobs = [self._start(us, launch) for launch in launches]
        if (self.config.decode_runs and len(jobs) == 1 and isinstance(jobs[0].cmd, DecodeCmd)
                and self._alone(us, jobs[0])):
            self._plan_run(us, jobs[0])
        for job in jobs:
            self._dispatch(job)
        self.stats["decisions"] += 1

    def _start(self, us: UnitState, launch: Launch) -> Job:
        """Check a launch against the unit's budgets and the processes' rules, then apply it."""
        name = self.policy.name
        llm = us.llms.get(launch.llm)
        if llm is None:
            raise RunnerError(f"policy {name} launched {launch.llm!r}, which is not on unit {us.unit.unit_id}")
        if launch.phase not in ("prefill", "decode"):
            raise RunnerError(f"policy {name} launched a {launch.phase!r} job; split mode runs 'prefill' and "
                              f"'decode' jobs (give the policy view mode 'split')")
        proc = llm.prefill if launch.phase == "prefill" else llm.decode
        if launch.sm_units > us.sm_free:
            raise RunnerError(f"policy {name} over-committed SM units on unit {us.unit.unit_id}: "
                              f"{launch.sm_units} asked, {us.sm_free} free")
        if proc.busy:
            raise RunnerError(f"policy {name} launched {llm.name}'s {proc.phase} while its process is busy")
        if min(100, launch.sm_units * SM_UNIT_PCT) != proc.slice.share_pct:
            raise RunnerError(f"policy {name} launched {llm.name}'s {proc.phase} at {launch.sm_units * SM_UNIT_PCT}% "
                              f"but its worker was started at {proc.slice.share_pct}% (a process's share is fixed)")
        for rid in launch.preempt:
            self._preempt(us, llm, rid)
        ids = set(launch.request_ids)
        if launch.phase == "prefill":
            batch = take_waiting(llm.waiting, ids)
        else:
            batch = [r for r in llm.running if r.request_id in ids and not r.busy]
        if len(batch) != len(ids):
            raise RunnerError(f"policy {name} launched unknown or busy request(s) for {llm.name}: "
                              f"{sorted(ids - {r.request_id for r in batch})[:5]}")
        taken = hold(batch, llm.chunk_blocks)
        if taken > min(llm.kv_quota - llm.kv_used, us.blocks.free):
            raise RunnerError(f"policy {name} over-committed KV blocks on unit {us.unit.unit_id}: "
                              f"{llm.name} needs {taken}, quota slack {llm.kv_quota - llm.kv_used}, "
                              f"pool free {us.blocks.free}")
        for r in batch:
            self._grow(us, llm, r)
        us.sm_free -= launch.sm_units
        if launch.phase == "prefill":
            cmd: PrefillCmd | DecodeCmd = PrefillCmd(tuple(
                PrefillItem(r.request_id, tuple(llm.tokens[r.request_id]), tuple(llm.tables[r.request_id]))
                for r in batch))
        else:
            cmd = self._decode_cmd(llm, batch, 1)
        job = Job(llm, proc, batch, launch.sm_units, cmd, self._now())
        proc.job = job
        return job

    @staticmethod
    def _decode_cmd(llm: LLMState, batch: list[Request], steps: int) -> DecodeCmd:
        return DecodeCmd(tuple(DecodeItem(r.request_id, llm.tokens[r.request_id][-1], r.context_tokens - 1,
                                          tuple(llm.tables[r.request_id]), r.remaining_tokens) for r in batch), steps)

    def _grow(self, us: UnitState, llm: LLMState, r: Request) -> None:
        """Give r's block table the ids for the `r.blocks` it now holds (charged to the LLM)."""
        table = llm.tables.setdefault(r.request_id, [])
        extra = r.blocks - len(table)
        table += us.blocks.allocate(extra)
        llm.kv_used += extra

    def _shrink(self, us: UnitState, llm: LLMState, r: Request, blocks: int) -> None:
        """Return r's block ids past the first `blocks` to the pool."""
        table = llm.tables.get(r.request_id, [])
        freed = table[blocks:]
        del table[blocks:]
        us.blocks.deallocate(freed)
        llm.kv_used -= len(freed)
        r.blocks = len(table)

    def _release(self, us: UnitState, llm: LLMState, r: Request) -> None:
        """A request leaves the LLM (finished, failed): its blocks go back to the pool, its tokens are dropped."""
        self._shrink(us, llm, r, 0)
        llm.tables.pop(r.request_id, None)
        llm.tokens.pop(r.request_id, None)

    def _alone(self, us: UnitState, job: Job) -> bool:
        """Could no idle process on the unit start anything? Then the policy would relaunch this decode
        at each step boundary until something changes, so it may repeat as is (`Simulator._pending_work`).
        Jobs already running elsewhere do not matter: their end is a change, which yields the run."""
        if any(j.llm.unit_id == us.unit.unit_id for j in self._deferred):
            return False  # a launch waits for cores: the run would keep them (the simulator ends runs too)
        for x in us.llms.values():
            if any(not r.busy for r in x.running):
                return False  # an idle decode process with work, or requests left out of the batch
            if (not x.prefill.busy and len(x.running) < x.placement.max_batch
                    and head_fits(x.waiting, x.chunk_blocks, min(x.kv_quota - x.kv_used, us.blocks.free))):
                return False
        return True

    def _plan_run(self, us: UnitState, job: Job) -> None:
        """Steps of a decode run: until its first request finishes, as far as its KV growth fits the
        slack. The blocks of every step are taken now, so the worker's tables cover the whole run."""
        llm = job.llm
        slack = min(llm.kv_quota - llm.kv_used, us.blocks.free)
        steps = decode_run_length([r.context_tokens for r in job.batch],
                                  min(r.remaining_tokens for r in job.batch), slack // llm.chunk_blocks)
        if steps <= 1:
            return
        for r in job.batch:
            r.blocks = blocks_for_tokens(r.context_tokens + steps - 1, llm.chunk_blocks)
            self._grow(us, llm, r)
        job.cmd = self._decode_cmd(llm, job.batch, steps)

    def _yield_runs(self, us: UnitState) -> None:
        """Ask the unit's decode runs to stop at their next step boundary: something changed, so the
        policy may launch something else beside them, or decide otherwise for their requests."""
        for llm in us.llms.values():
            job = llm.decode.job
            if job is None or job.max_steps == 1:
                continue
            if not job.dispatched:
                for r in job.batch:
                    self._shrink(us, llm, r, blocks_for_tokens(r.context_tokens, llm.chunk_blocks))
                job.cmd = self._decode_cmd(llm, job.batch, 1)
            elif not job.yielded:
                job.yielded = True
                job.proc.worker.send(Yield())

    def _preempt(self, us: UnitState, llm: LLMState, rid: int) -> None:
        r = next((r for r in llm.running if r.request_id == rid and not r.busy), None)
        if r is None:
            raise RunnerError(f"policy {self.policy.name} preempted request {rid}, not idle-running on {llm.name}")
        llm.running.remove(r)
        self._shrink(us, llm, r, 0)
        requeue_preempted(llm.waiting, r)  # its blocks are back in the pool already: frees 0 here
        self.stats["preemptions"] += 1

    def _dispatch(self, job: Job) -> None:
        """Send the job now, or hold it while another worker runs on any of its cores (oldest first)."""
        if self._must_wait(job):
            self._deferred.append(job)
            self.stats["deferred_launches"] += 1
        else:
            self._send(job)

    def _send(self, job: Job) -> None:
        running = [p for _, p in self._by_conn.values()]
        other = job.llm.decode if job.proc is job.llm.prefill else job.llm.prefill
        self.stats["sent_beside_own_other_phase"] += other in running
        self.stats["sent_beside_other_llm"] += any(p not in (job.llm.prefill, job.llm.decode) for p in running)
        job.dispatched = True
        job.t_sent = time.monotonic()
        job.proc.worker.send(job.cmd)
        assert job.proc.worker.conn is not None
        self._by_conn[job.proc.worker.conn] = (job.llm, job.proc)

    def _must_wait(self, job: Job) -> bool:
        cores = job.proc.slice.cores
        if not cores:
            return False  # GPU: MPS shares the SMs, nothing to serialise
        return (any(overlapping(cores, p.slice.cores) for _, p in self._by_conn.values())
                or any(overlapping(cores, j.proc.slice.cores) for j in self._deferred))

    def _release_deferred(self) -> None:
        """Start held launches, oldest first, as far as their cores are now free."""
        held, self._deferred = self._deferred, deque()
        for job in held:
            if self._must_wait(job):
                self._deferred.append(job)
            else:
                self._send(job)

    def _job_done(self, llm: LLMState, proc: Proc) -> None:
        reply: PhaseDone = proc.worker.recv(what=f"a {proc.phase} result")
        job = proc.job
        assert proc.worker.conn is not None and job is not None
        del self._by_conn[proc.worker.conn]
        self._check(llm, job, reply)
        steps = reply.steps
        self.stats["steps"] += steps
        self._step_s[proc.phase].extend(reply.step_s)
        us = self.units[llm.unit_id]
        t_end = reply.t_end - self._t0
        done = []
        for r in job.batch:
            llm.tokens[r.request_id] += reply.new_tokens[r.request_id]
            r.generated += steps
            r.busy = False
            if r.remaining_tokens <= 0:
                done.append(r)
        if proc.phase == "prefill":
            self.stats["prefills"] += 1
            for r in job.batch:
                if math.isnan(r.first_token_s):  # not set yet: a first admission, not a recompute
                    r.first_token_s = reply.t_first_end - self._t0
                bisect.insort(llm.running, r, key=age)
        else:
            self.stats["decode_runs"] += steps > 1
            if job.max_steps > steps:  # a run that yielded early: return the blocks of the steps not taken
                for r in job.batch:
                    self._shrink(us, llm, r, blocks_for_tokens(r.context_tokens - 1, llm.chunk_blocks))
        if done:
            gone = set(done)
            llm.running = [r for r in llm.running if r not in gone]
            for r in done:
                self._release(us, llm, r)
                self._record(us, r, "finished", finish_s=t_end)
        proc.job = None
        us.sm_free += job.sm_units
        proc.idle_since = t_end
        us.dirty = True
        self._release_deferred()

    def _check(self, llm: LLMState, job: Job, reply: PhaseDone) -> None:
        """Did the worker do what was launched: the right number of tokens each, the right ones done?
        Checked before any state changes, so a stop still records the job's requests."""
        problems = []
        steps = reply.steps
        if not 1 <= steps <= job.max_steps:
            problems.append(f"ran {steps} steps, launched for at most {job.max_steps}")
        for r in job.batch:
            got = len(reply.new_tokens.get(r.request_id, ()))
            if got != steps:
                problems.append(f"request {r.request_id} got {got} tokens in {steps} step(s)")
        if isinstance(job.cmd, DecodeCmd):
            expected = {r.request_id for r in job.batch if r.remaining_tokens <= steps}
            if expected != set(reply.finished):
                problems.append(f"worker finished {sorted(reply.finished)}, runner expected {sorted(expected)}")
        if problems:
            self.stats["anomalies"].extend(f"{llm.name}/{job.proc.phase}: {p}" for p in problems)
            if self.config.strict:
                raise RunnerError(f"{job.proc.phase} worker of {llm.name} deviated from its launch: "
                                  f"{'; '.join(problems[:3])}")

    # ---- records --------------------------------------------------------------------------------
    def _record(self, us: UnitState, r: Request, status: str, reason: str = "", finish_s: float = math.nan) -> None:
        assert self.writer is not None
        self.writer.add(r.request_id, r.llm, us.unit.unit_id, r.arrival_s, r.first_token_s, finish_s,
                        r.prompt_tokens, r.output_tokens, r.preemptions, status, reason)

    def _fail_leftovers(self, why: str) -> None:
        """Every request not finished is recorded once as failed with `why`, and its blocks returned."""
        for us in self.units.values():
            for llm in us.llms.values():
                in_prefill = llm.prefill.job.batch if llm.prefill.job else []
                for r in [*llm.waiting, *llm.running, *in_prefill]:
                    self._release(us, llm, r)
                    self._record(us, r, "failed", why)
                llm.waiting.clear()
                llm.running.clear()
                llm.prefill.job = llm.decode.job = None
        for i in range(self._next_arrival, len(self._rows[0])):
            rid, name, t, prompt, output = (col[i] for col in self._rows)
            llm = self._llms.get(str(name))
            if llm is None:
                continue  # the runner stopped before its units were built: nothing was replayed
            self._record(self.units[llm.unit_id], Request(int(rid), str(name), float(t), int(prompt), int(output)),
                         "failed", f"{why}; arrives at {float(t):g}s, after the replay stopped")
        self._next_arrival = len(self._rows[0])


def run_split(workload: Workload, placement: Placement, policy: BatchingPolicy, specs: dict[str, ModelSpec],
              **config: Any) -> RunResult:
    """Replay `workload` in split mode on real engines; keyword arguments are `RunnerConfig` fields."""
    return SplitRunner(workload, placement, policy, specs, RunnerConfig(**config)).run()
