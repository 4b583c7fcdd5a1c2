"""What a batching policy sees and returns: a read-only snapshot of one unit, and launches.

Both executors (SimPy simulator, hardware runner) build these same objects from one unit ledger
(`policies.ledger`), which is what lets one policy object drive simulated time and real engines
alike. Nothing here changes a request: the ledger does.

Token accounting follows vLLM v1: a request tracks tokens generated against tokens needed; there is
no separate "prefill state". A prefill job computes the request's whole context (prompt plus
anything generated before a preemption) and emits one token; each decode step emits one more.
While a job runs, a request holds KV blocks for its current context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, TypeVar, get_args

from policies.placement import LLMPlacement

Phase = Literal["prefill", "decode", "mixed"]
# "split": MuxServe's execution, one prefill and one decode process per LLM, sharing KV blocks.
# "mixed": a stock engine (vLLM) per LLM, one step serving new prefills and running decodes together.
ExecutionMode = Literal["split", "mixed"]
EXECUTION_MODES: tuple[str, ...] = get_args(ExecutionMode)


@dataclass(eq=False, slots=True)
class Request:
    """Mutable per-request state, owned by an executor. Policies must only read it."""

    request_id: int
    llm: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    generated: int = 0
    first_token_s: float = math.nan
    preemptions: int = 0
    blocks: int = 0
    busy: bool = False  # inside a running job

    @property
    def context_tokens(self) -> int:
        """Tokens whose KV the next job needs: the prompt plus everything generated so far."""
        return self.prompt_tokens + self.generated

    @property
    def remaining_tokens(self) -> int:
        return self.output_tokens - self.generated


def age(r: Request) -> tuple[float, int]:
    """FCFS order, ties broken by id, so every executor orders same-instant requests alike."""
    return (r.arrival_s, r.request_id)


def kv_slack(kv_quota: int, kv_used: int, pool_free: int) -> int:
    """Blocks an LLM may still take: bounded by its own quota and by the shared pool. The one
    formula, for policies reading a view and for the ledger (`policies.ledger`) alike."""
    return min(kv_quota - kv_used, pool_free)


T = TypeVar("T")


class ReadOnlyQueue(Sequence[T]):
    """A read-only window on an executor's queue, made in O(1) however long the queue is."""

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[T]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self._items[i]

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)


# The views and launches are NamedTuples: immutable records like frozen dataclasses, but made in
# C. A frozen dataclass sets each field through object.__setattr__; one is made per LLM at every
# decision (BENCHMARKS.md, "views as NamedTuples": 1.8 µs against 0.34 µs for an LLMView).


class LLMView(NamedTuple):
    placement: LLMPlacement
    chunk_blocks: int  # pool blocks per BLOCK_TOKENS tokens of this model's context
    waiting: Sequence[Request]  # FCFS order; preempted requests sit at the front
    # Admitted, not finished, oldest first (`age`). Some may be in a job (`busy`), but only while
    # the decode process is (`decode_busy`): only decode and mixed jobs take running requests.
    running: Sequence[Request]
    running_ids: Sequence[int]  # their ids, in the same order: a batch of the first ones is named by a slice
    prefill_busy: bool
    decode_busy: bool
    kv_used: int
    kv_quota: int
    # When each process last finished a job: round-robin as "least recently served first", a pure
    # function of the view, so a policy needs no memory of its own past calls.
    prefill_idle_since: float = -1.0
    decode_idle_since: float = -1.0

    @property
    def name(self) -> str:
        return self.placement.name


class UnitView(NamedTuple):
    unit_id: int
    now: float
    mode: ExecutionMode
    sm_units_total: int
    sm_units_free: int
    kv_blocks_total: int
    kv_blocks_free: int
    llms: tuple[LLMView, ...]


class Launch(NamedTuple):
    """Run one job: `phase` for `llm` over `request_ids` on `sm_units` SM units.

    `preempt` lists running requests of this LLM to send back to the front of its queue (freeing
    their blocks, to be recomputed) before the job starts: how a policy answers a full KV pool.
    """

    llm: str
    phase: Phase
    request_ids: tuple[int, ...]
    sm_units: int
    preempt: tuple[int, ...] = ()


class BatchingPolicy(Protocol):
    """Decides, from a snapshot of one unit, which jobs to start now.

    Contract the executors rely on (and tests check):
    - `decide` is a pure function of the view, so asking twice about the same situation gives the
      same answer; it does not read the token counts of requests that are `busy` (in a job, these
      are as of the job's start);
    - it only launches what fits (free SM units, KV quota and pool);
    - if the only runnable work on a unit is one LLM's decode, it launches that decode over all the
      LLM's idle running requests (up to its batch cap), so a run of such steps can be skipped over.
    """

    name: str
    exclusive: bool  # at most one job per unit at a time; otherwise quotas must partition the pool
    quota_period_s: float  # how often `quotas` is asked again; 0 = set once
    max_prefill_tokens: int  # the most prompt tokens one launch admits (engines build their shapes up to it)

    def quotas(self, view: UnitView) -> dict[str, int]: ...

    def decide(self, view: UnitView) -> list[Launch]: ...
