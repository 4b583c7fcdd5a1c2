"""One unit's bookkeeping, without time: what both executors do alike, written once.

The simulator (`sim/engine.py`) and the hardware runners (`hwloop/replay.py`) differ only in where
time comes from (SimPy events, a wall clock and engine replies). Everything they must do alike to
be comparable lives here: the LLMs' queues and process states, the unit's SM units and KV pool,
admission on arrival, quotas, checking and applying a `Launch` (preemption included), the end of a
job, and the request records with one set of failure reasons. Both executors call the same
`UnitLedger` methods with the same arguments; the one place they differ, the context limit of an
arrival (a model's `max_context` in simulation, a real engine's `max_model_len`), is an explicit
parameter of `UnitLedger.arrive`.

KV accounting, nano-vllm style: a `BlockPool` alone changes the count of blocks. A request holds
the blocks of its context (`Request.blocks`); the ledger asks the pool to `resize` a request when
that number changes and to `release` it when it leaves (finished or preempted), and reads the
pool's `free` and `used` counts. `kv_slack` is the one formula for what an LLM may still take.

Extension point, a pool that assigns block ids: subclass `BlockPool` and override `resize` and
`release` (call the base methods for the counts). The ledger calls them once per request whose
block count changes, so a subclass can keep each request's block table, e.g. for a shared-memory
paged KV cache whose block ids must be exactly the blocks this ledger allocates. `resize` is only
ever asked for more than `free` blocks when a policy broke its budget; the ledger raises
`LedgerError` right after, so a pool that cannot hand out ids may raise its own error there.
The simulator's pool only counts; most decode steps cross no block boundary, so the calls are rare
(one per request per `BLOCK_TOKENS` steps).

A ledger given a `JobLog` also writes one row per job that ended (when it ran, how many steps,
what its first step held), in both executors alike, so their step times can be set against the
profile's for the same steps (`experiments.validate`: how far the yardstick was off during a run).

Nothing here knows about time except as numbers handed in (`now`, a token's time), so one unit's
bookkeeping can be tested on its own (tests/test_ledger.py).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from policies.placement import BLOCK_TOKENS, SM_UNIT_PCT, LLMPlacement, Unit, blocks_for_tokens
from policies.records import RecordWriter
from policies.specs import ModelSpec
from policies.view import (
    ExecutionMode,
    Launch,
    LLMView,
    Phase,
    ReadOnlyQueue,
    Request,
    UnitView,
    age,
    kv_slack,
)


class LedgerError(RuntimeError):
    """A policy broke a rule of the unit (over-committed budget, unknown or busy request)."""


# ---- failure reasons: the one wording both executors record ---------------------------------------

STUCK = "never scheduled (stuck: no KV room)"


def too_long(total: int, model: str, limit: int) -> str:
    return f"prompt+output {total} tokens exceeds {model} context {limit}"


def too_big(need: int, pool: int) -> str:
    return f"needs {need} KV blocks, unit pool has {pool}"


def past_horizon(horizon_s: float) -> str:
    return f"not finished by horizon {horizon_s:g}s"


def not_arrived(why: str) -> str:
    """A request the run never reached: `why` the run stopped. Its arrival is in its record, so the
    reason stays one string for all of them and a summary can count them together."""
    return f"{why}; arrives after the run stopped"


# ---- KV blocks --------------------------------------------------------------------------------------

class BlockPool:
    """A unit's KV pool: how many blocks are free, and how many each LLM holds.

    The only code that changes `Request.blocks`, `free` and `used`. This one counts; a pool that
    also assigns block ids overrides `resize` and `release` (module docstring).
    """

    def __init__(self, total: int, llms: Iterable[str]) -> None:
        self.total = total
        self.free = total
        self.used: dict[str, int] = {name: 0 for name in llms}

    def resize(self, r: Request, blocks: int) -> None:
        """Make `r` hold exactly `blocks` blocks (more as its context grows, 0 when it leaves)."""
        grown = blocks - r.blocks
        self.free -= grown
        self.used[r.llm] += grown
        r.blocks = blocks

    def release(self, r: Request) -> int:
        """Give back every block `r` holds; returns how many."""
        held = r.blocks
        if held:
            self.resize(r, 0)
        return held


# ---- state --------------------------------------------------------------------------------------

@dataclass(eq=False)
class LLMState:
    """One served LLM on a unit: its queue, its running requests and its processes.

    In "split" mode the LLM has a prefill and a decode process; in "mixed" mode one engine, which
    is both (the two flags move together).
    """

    placement: LLMPlacement
    spec: ModelSpec
    chunk_blocks: int  # pool blocks per BLOCK_TOKENS tokens of this model's context
    waiting: deque[Request] = field(default_factory=deque)  # FCFS; preempted requests at the front
    running: list[Request] = field(default_factory=list)  # admitted, not finished, oldest first
    running_ids: list[int] = field(default_factory=list)  # their ids, in the same order
    prefill_busy: bool = False
    decode_busy: bool = False
    kv_quota: int = 0
    prefill_idle_since: float = -1.0
    decode_idle_since: float = -1.0
    running_busy: int = 0  # how many of `running` are inside a job

    def __post_init__(self) -> None:
        self.name = self.placement.name  # an attribute, not a property: read at every launch
        # Views wrap the same containers every time: they are only ever changed in place.
        self._waiting_view = ReadOnlyQueue(self.waiting)
        self._running_view = ReadOnlyQueue(self.running)
        self._running_ids_view = ReadOnlyQueue(self.running_ids)


@dataclass(eq=False, slots=True)
class Batch:
    """A launch as applied: the requests of one job, and what its timing needs to know.

    `requests` lists the newly admitted ones first (`admitted` of them), then the decoding ones.
    The context sums and `min_left` are taken at launch, in the same pass that grows the blocks.
    """

    llm: LLMState
    phase: Phase
    requests: list[Request]
    admitted: int
    sm_units: int
    admitted_context: int  # summed context tokens of the admitted requests
    decoding_context: int  # the same, of the decoding ones
    min_left: int  # fewest tokens any request of the batch still has to generate

    @property
    def decoding(self) -> int:
        return len(self.requests) - self.admitted

    @property
    def step_tokens(self) -> int:
        """The tokens the job's first step runs through the model: each admitted request's context
        (its prefill) and one per decoding request: the rows of the step's matrix products."""
        return self.admitted_context + self.decoding


JOB_COLUMNS = ("unit", "llm", "model", "tp", "sm_pct", "phase", "start_s", "first_end_s", "end_s", "steps",
               "admitted", "admitted_context", "decoding", "decoding_context")


class JobLog:
    """One row per ended job, `JOB_COLUMNS`: its unit, LLM, model type, tensor parallelism and SM
    share; its phase; when it started on its worker (`start_s`: the simulator's start, the runner's
    send), its first step ended and it ended; its steps (more than one: a decode run); and its first
    step's batch: requests admitted and their summed context, requests decoding and theirs."""

    def __init__(self) -> None:
        self.rows: list[tuple[object, ...]] = []

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(JOB_COLUMNS))


class UnitLedger:
    """One unit's state and every change to it, as both executors apply it."""

    def __init__(self, unit: Unit, specs: dict[str, ModelSpec], chunk_blocks: dict[str, int],
                 mode: ExecutionMode, exclusive: bool, writer: RecordWriter,
                 pool: BlockPool | None = None, jobs: JobLog | None = None) -> None:
        self.unit, self.mode, self.exclusive, self.writer, self.jobs = unit, mode, exclusive, writer, jobs
        self.llms = {x.name: LLMState(x, specs[x.model], chunk_blocks[x.model]) for x in unit.llms}
        self.pool = pool if pool is not None else BlockPool(unit.kv_blocks, self.llms)
        self.sm_free = unit.sm_units
        self.batches: set[Batch] = set()  # jobs started and not ended
        self.preemptions = 0

    # ---- reading ----------------------------------------------------------------------------------
    def kv_used(self, llm: LLMState) -> int:
        return self.pool.used[llm.placement.name]

    def slack(self, llm: LLMState) -> int:
        return kv_slack(llm.kv_quota, self.pool.used[llm.placement.name], self.pool.free)

    def view(self, now: float) -> UnitView:
        used = self.pool.used
        llms = tuple([LLMView(x.placement, x.chunk_blocks, x._waiting_view, x._running_view, x._running_ids_view,
                              x.prefill_busy, x.decode_busy, used[name], x.kv_quota, x.prefill_idle_since,
                              x.decode_idle_since)
                      for name, x in self.llms.items()])
        return UnitView(self.unit.unit_id, now, self.mode, self.unit.sm_units, self.sm_free,
                        self.unit.kv_blocks, self.pool.free, llms)

    def busy(self) -> bool:
        return bool(self.batches)

    def idle_work(self) -> bool:
        """Could an idle process on the unit start something now? When not, and a lone decode runs,
        any policy would relaunch that same decode at its next step boundary: an executor may let
        it repeat without asking (the simulator's skipping, the runner's decode runs)."""
        for llm in self.llms.values():
            idle_prefill = not (llm.decode_busy if self.mode == "mixed" else llm.prefill_busy)
            if idle_prefill and len(llm.running) < llm.placement.max_batch and self.head_fits(llm):
                return True
            if llm.running_busy < len(llm.running):
                return True  # an idle decode process with work, or requests left out of a batch
        return False

    def head_fits(self, llm: LLMState) -> bool:
        """Could the head of the queue be admitted within the slack? Admission is FCFS, so when the
        head cannot, nothing behind it can."""
        if not llm.waiting:
            return False
        head = llm.waiting[0]
        return blocks_for_tokens(head.context_tokens, llm.chunk_blocks) - head.blocks <= self.slack(llm)

    def has_waiting(self) -> bool:
        return any(x.waiting for x in self.llms.values())

    def has_requests(self) -> bool:
        return bool(self.batches) or any(x.waiting or x.running for x in self.llms.values())

    # ---- arrivals and quotas ----------------------------------------------------------------------
    def arrive(self, r: Request, context_limit: int) -> bool:
        """Queue an arriving request, or record it failed if it can never be served here: longer
        than `context_limit` tokens, or needing more blocks than the whole pool. True if queued."""
        llm = self.llms[r.llm]
        total = r.prompt_tokens + r.output_tokens
        if total > context_limit:
            self.fail(r, too_long(total, llm.spec.name, context_limit))
            return False
        need = blocks_for_tokens(total, llm.chunk_blocks)
        if need > self.unit.kv_blocks:
            self.fail(r, too_big(need, self.unit.kv_blocks))
            return False
        llm.waiting.append(r)
        return True

    def set_quotas(self, quotas: dict[str, int], policy: str) -> bool:
        """Apply a policy's KV quotas; True if any changed. Quotas of a policy that runs jobs side by
        side must partition the pool."""
        if not self.exclusive and sum(quotas.values()) > self.unit.kv_blocks:
            raise LedgerError(f"unit {self.unit.unit_id}: policy {policy} set KV quotas summing to "
                              f"{sum(quotas.values())} > pool {self.unit.kv_blocks}")
        changed = False
        for name, q in quotas.items():
            llm = self.llms[name]
            changed = changed or llm.kv_quota != q
            llm.kv_quota = q
        return changed

    # ---- launches ---------------------------------------------------------------------------------
    def apply(self, launch: Launch, policy: str) -> Batch:
        """Check a launch against the unit's rules and budgets, then apply it: preempt, admit, grow
        each request to the blocks of its whole current context, mark the processes busy.

        The state is changed before the KV budget is checked (one pass over the batch, at every
        decode step); on a `LedgerError` the run stops and every request is still in a queue or a
        batch, so `fail_leftovers` records it.
        """
        unit_id = self.unit.unit_id
        llm = self.llms.get(launch.llm)
        if llm is None:
            raise LedgerError(f"policy {policy} launched {launch.llm!r}, which is not on unit {unit_id}")
        if launch.sm_units > self.sm_free:
            raise LedgerError(f"policy {policy} over-committed SM units on unit {unit_id}: "
                              f"{launch.sm_units} asked, {self.sm_free} free")
        phase = launch.phase
        if phase == "mixed" and self.mode != "mixed":  # it would mark neither process busy
            raise LedgerError(f"policy {policy} launched a {phase} job of {llm.name} in {self.mode} mode")
        busy = llm.prefill_busy if phase == "prefill" else llm.decode_busy
        if busy or (self.exclusive and self.batches):
            raise LedgerError(f"policy {policy} launched {phase} of {llm.name} on a busy process")
        for rid in launch.preempt:
            self._preempt(llm, rid, policy)
        named = launch.request_ids
        ids: set[int] | None = None  # the named ids as a set, only when something needs a search
        admitted: list[Request] = []
        if phase != "decode" and llm.waiting:
            ids = set(named)
            admitted = self._take_waiting(llm, ids)
        decoding: list[Request] = []
        pool, chunk, block, up = self.pool, llm.chunk_blocks, BLOCK_TOKENS, BLOCK_TOKENS - 1
        admitted_context = decoding_context = 0
        min_left = 1 << 62
        for r in admitted:
            r.busy = True
            context = r.prompt_tokens + r.generated
            admitted_context += context
            blocks = blocks_for_tokens(context, chunk)
            if blocks != r.blocks:
                pool.resize(r, blocks)
            left = r.output_tokens - r.generated
            if left < min_left:
                min_left = left
        if phase != "prefill" and len(admitted) < len(named):
            # No running request is busy here: only a decode or mixed job takes running requests,
            # and this LLM's decode process was just checked idle. Policies name the decoding
            # requests in running order, usually from its start: then they are a slice, not a search.
            rest = named[len(admitted):]
            if tuple(llm.running_ids[: len(rest)]) == rest:
                decoding = llm.running[: len(rest)]
            else:
                ids = ids or set(named)
                decoding = [r for r in llm.running if r.request_id in ids]
            # The simulator's hottest loop: at every decode step, over the whole batch.
            for r in decoding:
                r.busy = True
                generated = r.generated
                context = r.prompt_tokens + generated
                decoding_context += context
                # blocks_for_tokens, inlined, rounding up by adding (BENCHMARKS.md, "inlined block counts")
                blocks = (context + up) // block * chunk
                if blocks != r.blocks:  # most decode steps cross no block boundary
                    pool.resize(r, blocks)
                if r.output_tokens - generated < min_left:
                    min_left = r.output_tokens - generated
        requests = admitted + decoding if admitted else decoding
        batch = Batch(llm, phase, requests, len(admitted), launch.sm_units, admitted_context,
                      decoding_context, min_left)
        self.batches.add(batch)
        llm.running_busy += len(decoding)
        self.sm_free -= launch.sm_units
        if phase == "prefill" or self.mode == "mixed":
            llm.prefill_busy = True
        if phase == "decode" or self.mode == "mixed":
            llm.decode_busy = True
        if len(requests) != len(named) or (ids is not None and len(ids) != len(named)):
            raise LedgerError(f"policy {policy} launched unknown, busy or repeated request(s) for {llm.name}: "
                              f"{sorted(set(named) - {r.request_id for r in requests})[:5] or list(named)[:5]}")
        used = pool.used[llm.name]
        if used > llm.kv_quota or pool.free < 0:
            raise LedgerError(f"policy {policy} over-committed KV blocks on unit {unit_id}: {llm.name} holds "
                              f"{used} of quota {llm.kv_quota}, pool free {pool.free}")
        return batch

    @staticmethod
    def _take_waiting(llm: LLMState, ids: set[int]) -> list[Request]:
        """Remove the admitted requests from the queue, in queue order (fast when taken from its head)."""
        waiting = llm.waiting
        taken: list[Request] = []
        while waiting and waiting[0].request_id in ids:
            taken.append(waiting.popleft())
        rest = [r for r in waiting if r.request_id in ids] if waiting and len(taken) < len(ids) else []
        if rest:
            kept = [r for r in waiting if r.request_id not in ids]
            taken += rest
            waiting.clear()
            waiting.extend(kept)
        return taken

    def _preempt(self, llm: LLMState, rid: int, policy: str) -> None:
        """Preempt by recompute: give back an idle running request's blocks and put it back at the
        front of its queue, behind requests preempted earlier that arrived before it."""
        r = next((r for r in llm.running if r.request_id == rid and not r.busy), None)
        if r is None:
            raise LedgerError(f"policy {policy} preempted request {rid}, not idle-running on {llm.name}")
        self._leave_running(llm, r)
        self.pool.release(r)
        r.preemptions += 1
        self.preemptions += 1
        waiting, pos = llm.waiting, 0
        while pos < len(waiting) and waiting[pos].preemptions and age(waiting[pos]) < age(r):
            pos += 1
        waiting.insert(pos, r)

    # ---- ends of jobs -----------------------------------------------------------------------------
    def hold_for_steps(self, batch: Batch, steps: int) -> None:
        """Grow each request of a run of `steps` decode steps to the blocks its last step computes
        (the first step's were taken at launch). Call before `end` advances the tokens; the simulator
        calls it when it plans the run, since step-by-step execution would hold them by the time
        anything else on the unit looks."""
        if steps <= 1:
            return
        pool, chunk, block = self.pool, batch.llm.chunk_blocks, BLOCK_TOKENS
        up = steps - 1 + BLOCK_TOKENS - 1  # the last step's context, rounded up to whole blocks
        for r in batch.requests:
            # blocks_for_tokens, inlined, rounding up by adding (BENCHMARKS.md, "inlined block counts")
            blocks = (r.prompt_tokens + r.generated + up) // block * chunk
            if blocks != r.blocks:
                pool.resize(r, blocks)

    def finish_early(self, batch: Batch, finished: Sequence[tuple[float, Request]]) -> None:
        """Requests of a running decode run that finish before its last step, with their finish
        times: leave the run, give back their blocks and are recorded (the simulator, when a run
        goes through finishes)."""
        if not finished:
            return
        llm = batch.llm
        requests = batch.requests
        llm.running_busy -= len(finished)
        for finish_s, r in finished:  # a few at a time: cheaper than rebuilding the lists
            del requests[requests.index(r)]
            self._leave_running(llm, r)
            r.generated, r.busy = r.output_tokens, False
            self.finish(r, finish_s)

    def end(self, batch: Batch, steps: int, first_token_s: float, end_s: float, start_s: float = math.nan) -> None:
        """A job has ended after `steps` steps (1 unless a decode run): every request gains `steps`
        tokens, the admitted ones got their first at `first_token_s` (the end of its first step;
        unless recomputed after a preemption) and join the running ones, the finished ones give
        back their blocks. `start_s`, when it started, is only for the job log."""
        self.batches.remove(batch)
        llm = batch.llm
        if self.jobs is not None:
            self.jobs.rows.append((self.unit.unit_id, llm.name, llm.spec.name, llm.placement.tp,
                                   min(100, batch.sm_units * SM_UNIT_PCT), batch.phase, start_s, first_token_s,
                                   end_s, steps, batch.admitted, batch.admitted_context, batch.decoding,
                                   batch.decoding_context))
        done = []
        if steps < batch.min_left:  # nobody finishes: the common case, one pass with less in it
            for r in batch.requests:
                r.generated += steps
                r.busy = False
        else:
            for r in batch.requests:
                r.generated += steps
                r.busy = False
                if r.generated >= r.output_tokens:
                    done.append(r)
        llm.running_busy -= len(batch.requests) - batch.admitted
        if batch.admitted:
            running, running_ids = llm.running, llm.running_ids
            for r in batch.requests[: batch.admitted]:
                if math.isnan(r.first_token_s):  # not set yet: first admission, not a recompute
                    r.first_token_s = first_token_s
                key = age(r)
                # Oldest first, whatever order jobs ended in; usually the youngest, so it goes last.
                at = len(running) if not running or age(running[-1]) <= key else bisect.bisect_right(running, key, key=age)
                running.insert(at, r)
                running_ids.insert(at, r.request_id)
        for r in done:
            self._leave_running(llm, r)  # few at a time: cheaper than rebuilding the list
            self.finish(r, end_s)
        self.sm_free += batch.sm_units
        if batch.phase == "prefill" or self.mode == "mixed":
            llm.prefill_busy = False
            llm.prefill_idle_since = end_s
        if batch.phase == "decode" or self.mode == "mixed":
            llm.decode_busy = False
            llm.decode_idle_since = end_s

    @staticmethod
    def _leave_running(llm: LLMState, r: Request) -> None:
        at = llm.running.index(r)
        del llm.running[at]
        del llm.running_ids[at]

    # ---- records ----------------------------------------------------------------------------------
    def finish(self, r: Request, finish_s: float) -> None:
        self.pool.release(r)
        self.writer.add(r.request_id, r.llm, self.unit.unit_id, r.arrival_s, r.first_token_s, finish_s,
                        r.prompt_tokens, r.output_tokens, r.preemptions, "finished")

    def fail(self, r: Request, reason: str) -> None:
        self.writer.add(r.request_id, r.llm, self.unit.unit_id, r.arrival_s, r.first_token_s, math.nan,
                        r.prompt_tokens, r.output_tokens, r.preemptions, "failed", reason)

    def fail_leftovers(self, reason: str) -> None:
        """Record every request still on the unit (waiting, running or newly admitted into a job)
        as failed with `reason`, once, and empty the unit: nothing is dropped."""
        in_jobs = [r for batch in self.batches for r in batch.requests[: batch.admitted]]
        for llm in self.llms.values():
            for r in [*llm.waiting, *llm.running, *(r for r in in_jobs if r.llm == llm.name)]:
                self.pool.release(r)
                self.fail(r, reason)
            llm.waiting.clear()
            llm.running.clear()
            llm.running_ids.clear()
            llm.running_busy = 0
        self.batches.clear()


def grows_within(requests: int, steps: int, slack_chunks: int) -> bool:
    """Would `steps` decode steps of `requests` requests fit `slack_chunks` new chunks even if every
    request grew at every chance (once per BLOCK_TOKENS steps, step 0's blocks held already)?"""
    return slack_chunks >= requests * -(-(steps - 1) // BLOCK_TOKENS)


def steps_within_kv(contexts: Sequence[int], left: Sequence[int], max_steps: int, slack_chunks: int) -> int:
    """How many of `max_steps` decode steps fit when the batch may grow by `slack_chunks` chunks.

    Step 0's blocks are already held. Request j needs one more chunk at steps first_j,
    first_j + BLOCK_TOKENS, ... with first_j in 1..BLOCK_TOKENS, so step s adds the requests whose
    first_j ≡ s (mod BLOCK_TOKENS) and that still take part (s < left_j); any BLOCK_TOKENS steps in
    a row grow each of them once. Blocks of requests that finished are not counted back: a run that
    stops early is relaunched as it is, so this stays exact. Both executors' decode runs use it.
    """
    if grows_within(len(contexts), max_steps, slack_chunks):
        return max_steps  # the common case, in O(1)
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
