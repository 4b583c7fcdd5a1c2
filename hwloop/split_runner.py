"""The split-mode runner: MuxServe's own execution, replayed in wall-clock time on real engines.

It executes the same `Placement` and `BatchingPolicy` objects as the simulator in "split" mode
and writes the same request records (`policies.records`), so the two compare row for row.

- **Processes**: a prefill worker and a decode worker per placed LLM (`hwloop.split_worker`),
  each pinned to its own core set on CPU, or an MPS client at its own thread percentage on NVIDIA
  (`hwloop.partition.split_cpu_slices` / `split_cuda_slices`), at the share the policy launches that
  phase with (`split_shares`), fixed for the run. Shares the cores cannot honour (less than one
  whole core) are refused in one line before any process starts.
- **The unit ledger** (`policies.ledger.UnitLedger`) does the bookkeeping, exactly as for the
  simulator: queues, admission, quotas, applying launches (preemption included), ends of jobs,
  records. Its KV pool is a `hwloop.kv_pool.BlockIdPool`: every block the ledger charges a request
  is a block id, appended to the request's block table, and the pool's free list is the unit's only
  free count. **One KV pool per unit** (`hwloop.kv_pool.KVPool`) holds those blocks, mapped by every
  worker of the unit.
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

import math
import multiprocessing.connection as mpc
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwloop.engine import synthetic_prompt
from hwloop.kv_pool import BlockIdPool, KVPool, PoolError, check_fits
from hwloop.mirror import gpu_core_table
from hwloop.partition import (
    MPSDaemon,
    PartitionError,
    Slice,
    overlapping,
    split_cpu_slices,
    split_cuda_slices,
)
from hwloop.runner import (
    Interrupted,
    RunnerConfig,
    RunnerError,
    RunnerUnit,
    RunResult,
    _sigterm_raises,
    _summary,
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
from policies.ledger import (
    STUCK,
    Batch,
    LedgerError,
    UnitLedger,
    not_arrived,
    past_horizon,
    steps_within_kv,
)
from policies.placement import (
    BLOCK_BYTES,
    SM_UNIT_PCT,
    Placement,
    Unit,
    blocks_for_tokens,
    blocks_per_chunk,
)
from policies.records import RecordWriter
from policies.specs import ModelSpec
from policies.view import BatchingPolicy, Launch, Request
from traces.schema import Workload

DTYPE_OF_BYTES = {2: "bfloat16", 4: "float32"}


@dataclass(eq=False)
class Proc:
    """One worker process of an LLM (its prefill or its decode) and the job it runs or waits to run."""

    llm: str
    phase: str
    unit_id: int
    slice: Slice
    worker: SplitWorkerHandle
    job: Job | None = None


@dataclass(eq=False)
class Job:
    proc: Proc
    batch: Batch
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
                                      "anomalies": [], "deferred_launches": 0, "sent_beside_own_other_phase": 0,
                                      "sent_beside_other_llm": 0, "policy": policy.name, "mode": "split",
                                      "device": self.config.device}
        self._step_s: dict[str, list[float]] = {"prefill": [], "decode": []}
        self._slices = self._check_inputs()  # every one-line refusal, before any process or pool exists
        self.writer = RecordWriter(self.config.records_path)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._mps: MPSDaemon | None = None
        self.units: dict[int, RunnerUnit] = {}
        self.pools: dict[int, KVPool] = {}
        self.workers: list[SplitWorkerHandle] = []
        self._procs: dict[tuple[str, str], Proc] = {}  # (LLM, phase) → its worker
        self._unit_of: dict[str, int] = placement.unit_of()
        self._by_conn: dict[Any, Proc] = {}
        self._deferred: deque[Job] = deque()
        self._tokens: dict[int, list[int]] = {}  # request id → its context's token ids (recompute needs them)
        self._t0 = 0.0
        df = workload.df
        self._rows = [df[c].to_numpy() for c in ("request_id", "model", "arrival_s", "prompt_tokens", "output_tokens")]
        self._next_arrival = 0

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
                if self.specs[x.model].dtype_bytes not in DTYPE_OF_BYTES:
                    raise RunnerError(f"{x.name} ({x.model}): dtype_bytes {self.specs[x.model].dtype_bytes} "
                                      f"not one of 2, 4")
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

    def _unit_cores(self, unit: Unit) -> list[int]:
        """The unit's cores: `gpu_cores` of its GPU indices, or this process's cores split evenly."""
        table = self.config.gpu_cores or gpu_core_table(sorted({g for u in self.placement.units for g in u.gpus}))
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
        chunks = {m: blocks_per_chunk(spec) for m, spec in self.specs.items()}
        for unit in self.placement.units:
            pool = self.pools[unit.unit_id] = KVPool(unit.kv_blocks, device)
            slices = (self._slices[unit.unit_id] if device == "cpu"
                      else split_cuda_slices(unit.llms, self.policy.exclusive, unit.gpus, self._mps))  # type: ignore[arg-type]
            for x, pair in zip(unit.llms, slices, strict=True):
                spec = self.specs[x.model]
                for phase, sl in zip(("prefill", "decode"), pair, strict=True):
                    wspec = SplitWorkerSpec(f"{x.name}/{phase}", x.name, phase, spec, pool.handle(),  # type: ignore[arg-type]
                                            dtype=DTYPE_OF_BYTES[spec.dtype_bytes], device=device,
                                            max_len=self.config.max_model_len or 0, cores=sl.cores, env=sl.env)
                    handle = SplitWorkerHandle(wspec, work / "logs" / f"{x.name}-{phase}.log",  # type: ignore[arg-type]
                                               unit=unit.unit_id)
                    handles.append(handle)
                    self._procs[x.name, phase] = Proc(x.name, phase, unit.unit_id, sl, handle)
            ids = BlockIdPool(unit.kv_blocks, [x.name for x in unit.llms])
            ledger = UnitLedger(unit, self.specs, chunks, "split", self.policy.exclusive, self.writer, pool=ids)
            self.units[unit.unit_id] = RunnerUnit(ledger)
        return handles

    def _ids(self, unit_id: int) -> BlockIdPool:
        pool = self.units[unit_id].ledger.pool
        assert isinstance(pool, BlockIdPool)
        return pool

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
                                                  "share_pct": self._procs[h.spec.llm, h.spec.phase].slice.share_pct}
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
                # After a crash too: every block is back once the leftovers are recorded (tests check).
                self.stats["kv_free_end"] = {i: u.ledger.pool.free for i, u in self.units.items()}
                self.stats["kv_total"] = {i: u.ledger.pool.total for i, u in self.units.items()}
                for pool in self.pools.values():
                    pool.close()
                self._records = self.writer.close()
                if self._tmp is not None:
                    self._tmp.cleanup()

    def _result(self) -> RunResult:
        self.stats["records"] = self.writer.count
        self.stats["preemptions"] = sum(u.ledger.preemptions for u in self.units.values())
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
                if unit.dirty:
                    self._yield_runs(unit)
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

    def _arrive(self, i: int) -> None:
        rid, name, t, prompt, output = (col[i] for col in self._rows)
        unit = self.units[self._unit_of[str(name)]]
        r = Request(int(rid), str(name), float(t), int(prompt), int(output))
        spec = unit.ledger.llms[r.llm].spec
        if unit.ledger.arrive(r, self.config.max_model_len or spec.max_context):
            self._tokens[r.request_id] = synthetic_prompt(r.request_id, r.prompt_tokens, spec.vocab_size)
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
        launches = self.policy.decide(unit.ledger.view(self._now()))
        jobs = [self._start(unit, launch) for launch in launches]
        if (self.config.decode_runs and len(jobs) == 1 and isinstance(jobs[0].cmd, DecodeCmd)
                and self._alone(unit)):
            self._plan_run(unit, jobs[0])
        for job in jobs:
            self._dispatch(job)
        self.stats["decisions"] += 1

    def _start(self, unit: RunnerUnit, launch: Launch) -> Job:
        """Check a launch against the processes' rules, then apply it to the unit's ledger (which
        checks it against the unit's budgets and takes its blocks from the id pool)."""
        name = self.policy.name
        if launch.phase not in ("prefill", "decode"):
            raise RunnerError(f"policy {name} launched a {launch.phase!r} job; split mode runs 'prefill' and "
                              f"'decode' jobs (give the policy view mode 'split')")
        proc = self._procs.get((launch.llm, launch.phase))
        if proc is not None and min(100, launch.sm_units * SM_UNIT_PCT) != proc.slice.share_pct:
            raise RunnerError(f"policy {name} launched {launch.llm}'s {launch.phase} at "
                              f"{launch.sm_units * SM_UNIT_PCT}% but its worker was started at "
                              f"{proc.slice.share_pct}% (a process's share is fixed)")
        try:
            batch = unit.ledger.apply(launch, name)
        except (LedgerError, PoolError) as e:
            raise RunnerError(str(e)) from e
        assert proc is not None  # the ledger knows every LLM of the unit
        cmd = self._prefill_cmd(batch) if launch.phase == "prefill" else self._decode_cmd(batch, 1)
        job = Job(proc, batch, cmd, self._now())
        proc.job = job
        return job

    def _prefill_cmd(self, batch: Batch) -> PrefillCmd:
        ids = self._ids(self._unit_of[batch.llm.name])
        return PrefillCmd(tuple(PrefillItem(r.request_id, tuple(self._tokens[r.request_id]), ids.table(r.request_id))
                                for r in batch.requests))

    def _decode_cmd(self, batch: Batch, steps: int) -> DecodeCmd:
        """Each request feeds its last token at position context - 1 (its blocks hold the rest)."""
        ids = self._ids(self._unit_of[batch.llm.name])
        return DecodeCmd(tuple(DecodeItem(r.request_id, self._tokens[r.request_id][-1], r.context_tokens - 1,
                                          ids.table(r.request_id), r.remaining_tokens) for r in batch.requests), steps)

    def _alone(self, unit: RunnerUnit) -> bool:
        """Could no idle process on the unit start anything (`UnitLedger.idle_work`)? Then the policy
        would relaunch this decode at each step boundary until something changes, so it may repeat
        as is. Jobs running elsewhere do not matter: their end is a change, which yields the run."""
        if any(self._unit_of[j.batch.llm.name] == unit.ledger.unit.unit_id for j in self._deferred):
            return False  # a launch waits for cores: a run would keep them (the simulator ends runs too)
        return not unit.ledger.idle_work()

    def _plan_run(self, unit: RunnerUnit, job: Job) -> None:
        """Steps of a decode run: until its first request finishes, as far as its KV growth fits the
        slack. The blocks of its last step are taken now, so the tables cover every step it may run."""
        batch = job.batch
        contexts = [r.context_tokens for r in batch.requests]
        left = [r.remaining_tokens for r in batch.requests]
        steps = steps_within_kv(contexts, left, batch.min_left, unit.ledger.slack(batch.llm) // batch.llm.chunk_blocks)
        if steps > 1:
            unit.ledger.hold_for_steps(batch, steps)
            job.cmd = self._decode_cmd(batch, steps)

    def _trim(self, unit: RunnerUnit, batch: Batch, steps: int) -> None:
        """A run cut short after `steps` steps: each request keeps the blocks of the last step taken."""
        pool, chunk = unit.ledger.pool, batch.llm.chunk_blocks
        for r in batch.requests:
            blocks = blocks_for_tokens(r.context_tokens + steps - 1, chunk)
            if blocks != r.blocks:
                pool.resize(r, blocks)

    def _yield_runs(self, unit: RunnerUnit) -> None:
        """Ask the unit's decode runs to stop at their next step boundary: something changed, so the
        policy may launch something beside them, or decide otherwise for their requests."""
        for name in unit.ledger.llms:
            proc = self._procs[name, "decode"]
            job = proc.job
            if job is None or job.max_steps == 1:
                continue
            if not job.dispatched:
                self._trim(unit, job.batch, 1)
                job.cmd = self._decode_cmd(job.batch, 1)
            elif not job.yielded:
                job.yielded = True
                proc.worker.send(Yield())

    def _dispatch(self, job: Job) -> None:
        """Send the job now, or defer it while another worker runs on any of its cores (oldest first)."""
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
        running = list(self._by_conn.values())
        self.stats["sent_beside_own_other_phase"] += any(p.llm == job.proc.llm for p in running)
        self.stats["sent_beside_other_llm"] += any(p.llm != job.proc.llm for p in running)
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
        reply: PhaseDone = proc.worker.recv(what=f"a {proc.phase} result")
        job = proc.job
        assert proc.worker.conn is not None and job is not None
        del self._by_conn[proc.worker.conn]
        self._check(job, reply)
        steps = reply.steps
        self.stats["steps"] += steps
        self.stats["prefills" if proc.phase == "prefill" else "decode_runs"] += proc.phase == "prefill" or steps > 1
        self._step_s[proc.phase].extend(reply.step_s)
        proc.job = None
        unit = self.units[proc.unit_id]
        batch = job.batch
        if job.max_steps > steps:
            self._trim(unit, batch, steps)  # blocks of the steps a yielded run did not take go back
        for r in batch.requests:
            self._tokens[r.request_id] += reply.new_tokens[r.request_id]
        unit.ledger.end(batch, steps, reply.t_first_end - self._t0, reply.t_end - self._t0)
        for r in batch.requests:
            if r.remaining_tokens <= 0:
                del self._tokens[r.request_id]
        unit.dirty = True
        self._release_deferred()

    def _check(self, job: Job, reply: PhaseDone) -> None:
        """Did the worker do what was launched: the right number of tokens each, the right ones done?
        Checked before any state changes, so a stop still records the job's requests."""
        problems = []
        steps = reply.steps
        if not 1 <= steps <= job.max_steps:
            problems.append(f"ran {steps} steps, launched for at most {job.max_steps}")
        for r in job.batch.requests:
            got = len(reply.new_tokens.get(r.request_id, ()))
            if got != steps:
                problems.append(f"request {r.request_id} got {got} tokens in {steps} step(s)")
        if isinstance(job.cmd, DecodeCmd):
            expected = {r.request_id for r in job.batch.requests if r.remaining_tokens <= steps}
            if expected != set(reply.finished):
                problems.append(f"worker finished {sorted(reply.finished)}, runner expected {sorted(expected)}")
        if problems:
            self.stats["anomalies"].extend(f"{job.proc.worker.name}: {p}" for p in problems)
            if self.config.strict:
                raise RunnerError(f"worker {job.proc.worker.name} deviated from its launch: {'; '.join(problems[:3])}")

    # ---- records --------------------------------------------------------------------------------
    def _fail_leftovers(self, why: str) -> None:
        """Every request not finished is recorded once as failed with `why`, and its blocks returned."""
        for unit in self.units.values():
            unit.ledger.fail_leftovers(why)
        for proc in self._procs.values():
            proc.job = None
        self._tokens.clear()
        for i in range(self._next_arrival, len(self._rows[0])):
            rid, name, t, prompt, output = (col[i] for col in self._rows)
            unit = self.units.get(self._unit_of[str(name)])
            if unit is None:
                continue  # the runner stopped before its units were built: no ledger to record in
            unit.ledger.fail(Request(int(rid), str(name), float(t), int(prompt), int(output)), not_arrived(why, float(t)))
        self._next_arrival = len(self._rows[0])


def run_split(workload: Workload, placement: Placement, policy: BatchingPolicy, specs: dict[str, ModelSpec],
              **config: Any) -> RunResult:
    """Replay `workload` in split mode on real engines; keyword arguments are `RunnerConfig` fields."""
    return SplitRunner(workload, placement, policy, specs, RunnerConfig(**config)).run()
