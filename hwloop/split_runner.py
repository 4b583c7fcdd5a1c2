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
- **What both runners do alike** (the wall-clock loop, quota ticks, core sharing, result checks,
  crash safety) is `hwloop.replay.ReplayRunner`'s. Here too a killed worker, Ctrl-C or SIGTERM
  records every unfinished request as failed with the cause; that returns every block to the pool
  (`stats["kv_free_end"]` = total). The pools are memfds (no name in /dev/shm), freed by the
  kernel when the last process mapping them is gone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hwloop.engine import synthetic_prompt
from hwloop.kv_pool import BlockIdPool, KVPool, PoolError, check_fits
from hwloop.partition import PartitionError, Slice, split_cpu_slices, split_cuda_slices
from hwloop.replay import (
    Job,
    Proc,
    ReplayRunner,
    RunnerConfig,
    RunnerError,
    RunnerUnit,
    RunResult,
    summary,
)
from hwloop.split_worker import (
    DTYPE_OF_BYTES,
    DecodeCmd,
    DecodeItem,
    PhaseDone,
    PrefillCmd,
    PrefillItem,
    SplitWorkerHandle,
    SplitWorkerSpec,
)
from policies.ledger import Batch, UnitLedger
from policies.placement import BLOCK_BYTES, Placement, blocks_for_tokens, blocks_per_chunk
from policies.specs import ModelSpec
from policies.view import BatchingPolicy, Launch, Request
from traces.schema import Workload


class SplitRunner(ReplayRunner):
    """Split mode: a prefill and a decode worker per placed LLM over one KV pool per unit."""

    mode = "split"
    decide_beside_runs = True

    def __init__(self, workload: Workload, placement: Placement, policy: BatchingPolicy,
                 specs: dict[str, ModelSpec], config: RunnerConfig | None = None) -> None:
        super().__init__(workload, placement, policy, specs, config)
        self.stats.update({"prefills": 0, "sent_beside_own_other_phase": 0, "sent_beside_other_llm": 0})
        self.pools: dict[int, KVPool] = {}
        self._tokens: dict[int, list[int]] = {}  # request id → its context's token ids (recompute needs them)

    # ---- set-up ---------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        """Every one-line refusal, before any process or pool exists; keeps the CPU slices."""
        super()._check_inputs()
        if any(x.tp > 1 for u in self.placement.units for x in u.llms):
            raise RunnerError("tensor parallelism > 1 is not supported by the split runner (one process per phase)")
        for u in self.placement.units:
            for x in u.llms:
                if self.specs[x.model].dtype_bytes not in DTYPE_OF_BYTES:
                    raise RunnerError(f"{x.name} ({x.model}): dtype_bytes {self.specs[x.model].dtype_bytes} "
                                      f"not one of 2, 4")
        self._slices: dict[int, list[tuple[Slice, Slice]]] = {}
        if self.config.device == "cuda":
            return  # MPS percentages are whatever the shares say; the pool's fit is checked as it is made
        weights = 2 * sum(self.specs[x.model].weight_bytes for u in self.placement.units for x in u.llms)
        pool = sum(u.kv_blocks for u in self.placement.units) * BLOCK_BYTES
        try:
            check_fits(pool + weights, "cpu", "the units' KV pools plus two copies of each LLM's weights")
            self._slices = {u.unit_id: split_cpu_slices(u.llms, self.policy.exclusive, self._unit_cores(u))
                            for u in self.placement.units}
        except (PoolError, PartitionError) as e:
            raise RunnerError(str(e)) from None

    def _build(self, work: Path) -> None:
        device = self.config.device
        daemon = self._mps_daemon(work)
        if daemon is not None:
            # The runner allocates the pools, so it is an MPS client of the same daemon as its workers
            # (CUDA IPC works between MPS clients of one server): set before this process touches CUDA.
            os.environ.update(daemon.env)
        chunks = {m: blocks_per_chunk(spec) for m, spec in self.specs.items()}
        for unit in self.placement.units:
            pool = self.pools[unit.unit_id] = KVPool(unit.kv_blocks, device)
            slices = (self._slices[unit.unit_id] if device == "cpu"
                      else split_cuda_slices(unit.llms, self.policy.exclusive, unit.gpus, daemon))
            for x, pair in zip(unit.llms, slices, strict=True):
                spec = self.specs[x.model]
                for phase, sl in zip(("prefill", "decode"), pair, strict=True):
                    wspec = SplitWorkerSpec(f"{x.name}/{phase}", x.name, phase, spec, pool.handle(),  # type: ignore[arg-type]
                                            dtype=DTYPE_OF_BYTES[spec.dtype_bytes], device=device,
                                            max_len=self.config.max_model_len or 0, cores=sl.cores, env=sl.env)
                    handle = SplitWorkerHandle(wspec, work / "logs" / f"{x.name}-{phase}.log", unit=unit.unit_id)
                    self._procs[x.name, phase] = Proc(x.name, phase, unit.unit_id, sl, handle)
            ids = BlockIdPool(unit.kv_blocks, [x.name for x in unit.llms])
            ledger = UnitLedger(unit, self.specs, chunks, "split", self.policy.exclusive, self.writer, pool=ids,
                                jobs=self.jobs)
            self.units[unit.unit_id] = RunnerUnit(ledger)

    def _ids(self, unit_id: int) -> BlockIdPool:
        pool = self.units[unit_id].ledger.pool
        assert isinstance(pool, BlockIdPool)
        return pool

    def _release(self) -> None:
        """After a crash too: every block is back once the leftovers are recorded (tests check)."""
        self.stats["kv_free_end"] = {i: u.ledger.pool.free for i, u in self.units.items()}
        self.stats["kv_total"] = {i: u.ledger.pool.total for i, u in self.units.items()}
        for pool in self.pools.values():
            pool.close()

    def _result(self) -> RunResult:
        self.stats["prefill_ms"] = summary(self._step_s.get("prefill", []), 1e3)
        self.stats["decode_step_ms"] = summary(self._step_s.get("decode", []), 1e3)
        return super()._result()

    # ---- arrivals -------------------------------------------------------------------------------
    def _context_limit(self, unit: RunnerUnit, r: Request) -> int:
        return self.config.max_model_len or unit.ledger.llms[r.llm].spec.max_context

    def _arrive(self, r: Request) -> bool:
        """The runner keeps each request's token ids: a prefill (or a recompute) sends them all."""
        if not super()._arrive(r):
            return False
        spec = self.units[self._unit_of[r.llm]].ledger.llms[r.llm].spec
        self._tokens[r.request_id] = synthetic_prompt(r.request_id, r.prompt_tokens, spec.vocab_size)
        return True

    # ---- launches -------------------------------------------------------------------------------
    def _start(self, unit: RunnerUnit, launch: Launch) -> Job:
        """Check a launch against the processes' rules, then apply it to the unit's ledger (which
        checks it against the unit's budgets and takes its blocks from the id pool)."""
        if launch.phase not in ("prefill", "decode"):
            raise RunnerError(f"policy {self.policy.name} launched a {launch.phase!r} job; split mode runs "
                              f"'prefill' and 'decode' jobs (give the policy view mode 'split')")
        proc = self._procs.get((launch.llm, launch.phase))
        self._check_share(launch, proc)
        batch = self._apply(unit, launch)
        assert proc is not None  # the ledger knows every LLM of the unit
        cmd = self._prefill_cmd(batch) if launch.phase == "prefill" else self._decode_cmd(batch, 1)
        job = Job(proc, batch, cmd)
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

    def _may_repeat(self, unit: RunnerUnit, job: Job) -> bool:
        """A decode, when no idle process on the unit could start anything (`UnitLedger.idle_work`):
        the policy would relaunch it at each step boundary until something changes. Jobs running
        elsewhere do not matter: their end is a change, which yields the run."""
        if not isinstance(job.cmd, DecodeCmd):
            return False
        if any(self._unit_of[j.batch.llm.name] == unit.ledger.unit.unit_id for j in self._deferred):
            return False  # a launch waits for cores: a run would keep them (the simulator ends runs too)
        return not unit.ledger.idle_work()

    def _extend(self, unit: RunnerUnit, job: Job, steps: int) -> None:
        """The blocks of the run's last step are taken now, so the tables cover every step it may run."""
        unit.ledger.hold_for_steps(job.batch, steps)
        job.cmd = self._decode_cmd(job.batch, steps)

    def _shorten(self, unit: RunnerUnit, job: Job) -> None:
        self._trim(unit, job.batch, 1)
        job.cmd = self._decode_cmd(job.batch, 1)

    def _trim(self, unit: RunnerUnit, batch: Batch, steps: int) -> None:
        """A run cut short after `steps` steps: each request keeps the blocks of the last step taken."""
        pool, chunk = unit.ledger.pool, batch.llm.chunk_blocks
        for r in batch.requests:
            blocks = blocks_for_tokens(r.context_tokens + steps - 1, chunk)
            if blocks != r.blocks:
                pool.resize(r, blocks)

    def _send(self, job: Job) -> None:
        """Counts how often a job starts beside its own LLM's other phase, or beside another LLM."""
        running = list(self._by_conn.values())
        self.stats["sent_beside_own_other_phase"] += any(p.llm == job.proc.llm for p in running)
        self.stats["sent_beside_other_llm"] += any(p.llm != job.proc.llm for p in running)
        super()._send(job)

    # ---- results --------------------------------------------------------------------------------
    def _check(self, job: Job, reply: PhaseDone) -> None:
        """A prefill finishes no request (its first token is the decode's to follow)."""
        tokens = {rid: len(new) for rid, new in reply.new_tokens.items()}
        finished = reply.finished if isinstance(job.cmd, DecodeCmd) else None
        self._deviations(job, reply.steps, tokens, finished, [])

    def _end(self, unit: RunnerUnit, job: Job, reply: PhaseDone) -> None:
        """The new tokens join each request's context; a yielded run's untaken blocks go back."""
        steps, batch = reply.steps, job.batch
        self.stats["prefills" if job.proc.phase == "prefill" else "decode_runs"] += (job.proc.phase == "prefill"
                                                                                      or steps > 1)
        if job.max_steps > steps:
            self._trim(unit, batch, steps)
        for r in batch.requests:
            self._tokens[r.request_id] += reply.new_tokens[r.request_id]
        unit.ledger.end(batch, steps, reply.t_first_end - self._t0, reply.t_end - self._t0, job.t_sent - self._t0)
        for r in batch.requests:
            if r.remaining_tokens <= 0:
                del self._tokens[r.request_id]

    def _fail_leftovers(self, why: str) -> None:
        """As for every runner, and the blocks of the failed requests are back in the pool."""
        super()._fail_leftovers(why)
        self._tokens.clear()


def run_split(workload: Workload, placement: Placement, policy: BatchingPolicy, specs: dict[str, ModelSpec],
              **config: Any) -> RunResult:
    """Replay `workload` in split mode on real engines; keyword arguments are `RunnerConfig` fields."""
    return SplitRunner(workload, placement, policy, specs, RunnerConfig(**config)).run()
