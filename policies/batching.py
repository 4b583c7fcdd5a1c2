"""Batching policies: ADBS (MuxServe), FCFS (temporal baseline) and round-robin.

Each is a small object with a `decide(view) -> list[Launch]`. The pieces they share — admitting
waiting requests FCFS within a KV budget, building a decode batch and choosing whom to preempt —
are the pure functions at the top.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from policies import view as contract
from policies.placement import BLOCK_TOKENS, SM_UNITS_FULL, blocks_for_tokens
from policies.view import Launch, LLMView, Request, UnitView, age


def kv_slack(llm: LLMView, view: UnitView) -> int:
    """Blocks this LLM may still take (`policies.view.kv_slack`)."""
    return contract.kv_slack(llm.kv_quota, llm.kv_used, view.kv_blocks_free)


def prefill_slack(llm: LLMView, view: UnitView) -> int:
    """KV slack a split-mode prefill may use: what is left after the next decode step of every running
    request (at most one chunk each, see `decode_batch`). An admission that took those blocks would
    make the next decode preempt, and under a full pool the two would take turns evicting each other.
    """
    return kv_slack(llm, view) - len(llm.running) * llm.chunk_blocks


def admit_fcfs(llm: LLMView, slack: int, max_tokens: int, max_requests: int) -> list[Request]:
    """Head of the queue, in order, while it fits the KV slack, the token budget and the batch cap.

    The head request is always admitted when its blocks fit, even past the token budget, so a prompt
    longer than the budget is still served (alone) rather than starved.
    """
    batch: list[Request] = []
    tokens = 0
    for r in llm.waiting:
        context = r.context_tokens
        need = blocks_for_tokens(context, llm.chunk_blocks)
        if len(batch) >= max_requests or need > slack or (batch and tokens + context > max_tokens):
            break
        batch.append(r)
        slack -= need
        tokens += context
    return batch


def decode_batch(llm: LLMView, slack: int) -> tuple[list[Request], list[Request]]:
    """Idle running requests for one decode step, and those preempted to make their blocks fit.

    Like vLLM, the most recently arrived requests are preempted first (recompute later), so the
    oldest keep making progress.
    """
    if llm.decode_busy:
        batch = [r for r in llm.running if not r.busy][: llm.placement.max_batch]
    else:  # none is busy (`LLMView.running`): a slice, not a pass, at every decode step
        batch = list(llm.running[: llm.placement.max_batch])
    if slack >= len(batch) * llm.chunk_blocks:
        # A running request holds the blocks of its context as of its last job's start, so one more
        # step grows it by at most one chunk: no need to look at each (this runs at every step).
        return batch, []
    # blocks_for_tokens, inlined: a full pool sees this at every step (BENCHMARKS.md, "inlined block counts")
    chunk = llm.chunk_blocks
    growth = [-(-(r.prompt_tokens + r.generated) // BLOCK_TOKENS) * chunk - r.blocks for r in batch]
    need = sum(growth)
    preempted: list[Request] = []
    while batch and need > slack:
        victim = max(range(len(batch)), key=lambda i: (batch[i].arrival_s, batch[i].request_id))
        need -= growth.pop(victim)
        slack += batch[victim].blocks
        preempted.append(batch.pop(victim))
    return batch, preempted


def decode_launch(llm: LLMView, view: UnitView, units: int, taken: int = 0) -> Launch | None:
    """`taken`: blocks this LLM's other launches of the same decision already claimed."""
    batch, preempted = decode_batch(llm, kv_slack(llm, view) - taken)
    if not batch:
        return None
    if preempted or llm.decode_busy:
        return Launch(llm.name, "decode", ids(batch), units, ids(preempted))
    return Launch(llm.name, "decode", tuple(llm.running_ids[: len(batch)]), units)  # the first running requests


def mixed_launch(llm: LLMView, view: UnitView, units: int, max_tokens: int) -> Launch | None:
    """One engine step: running decodes plus newly admitted prefills (stock vLLM execution)."""
    batch, preempted = decode_batch(llm, kv_slack(llm, view))
    slack = kv_slack(llm, view) - sum(
        blocks_for_tokens(r.context_tokens, llm.chunk_blocks) - r.blocks for r in batch
    ) + sum(r.blocks for r in preempted)
    room = llm.placement.max_batch - len(batch)
    admitted = [] if preempted else admit_fcfs(llm, slack, max_tokens, room)
    if not batch and not admitted:
        return None
    return Launch(llm.name, "mixed", ids(admitted) + ids(batch), units, ids(preempted))


class BatchingOptionError(ValueError):
    """An option out of its range; the message starts with the option's name."""


def check_option(name: str, value: object, rule: str, ok: bool) -> None:
    if not ok:
        raise BatchingOptionError(f"{name} must be {rule} (got {value!r})")


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_common(policy: ADBS | _Exclusive) -> None:
    """The options every batching policy has."""
    tokens, period = policy.max_prefill_tokens, policy.quota_period_s
    check_option("max_prefill_tokens", tokens, "an integer ≥ 1",
                 isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1)
    check_option("quota_period_s", period, "a number ≥ 0 (0: quotas never move)", is_number(period) and period >= 0)


def ids(requests: Iterable[Request]) -> tuple[int, ...]:
    return tuple([r.request_id for r in requests])


def has_idle_running(llm: LLMView) -> bool:
    if not llm.decode_busy:  # none is busy (`LLMView.running`): no pass over them
        return len(llm.running) > 0
    return any(not r.busy for r in llm.running)


def least_recently_served(llms: Sequence[LLMView], phase: str) -> list[LLMView]:
    """Round-robin order: the process idle the longest goes first (ties in placement order)."""
    if phase == "prefill":
        return sorted(llms, key=lambda x: x.prefill_idle_since)
    return sorted(llms, key=lambda x: x.decode_idle_since)


def proportional_split(total: int, weights: dict[str, float], floor: dict[str, int]) -> dict[str, int]:
    """Split `total` blocks ∝ weights, each at least its floor when the total allows; sums ≤ total."""
    names = list(weights)
    base = {n: min(floor.get(n, 0), total // max(len(names), 1)) for n in names}
    rest = total - sum(base.values())
    wsum = sum(weights.values()) or 1.0
    out = {n: base[n] + int(rest * weights[n] / wsum) for n in names}
    return out


@dataclass
class ADBS:
    """MuxServe's adaptive batch scheduling (paper Alg. 3).

    Prefills go first, round-robin over LLMs, each at its prefill SM share; decodes fill the SM units
    left, but none starts while a prefill that has KV room waits for SM units, so
    units drain towards it. KV quotas start ∝ rate × KV size and move every `quota_period_s` from
    LLMs with slack to LLMs whose queues their quota blocks.
    """

    max_prefill_tokens: int = 2048
    quota_period_s: float = 5.0
    high_util: float = 0.9
    low_util: float = 0.5
    name: str = "adbs"
    exclusive: bool = False

    def __post_init__(self) -> None:
        """Options are checked here, where they enter: a negative budget or a utilisation above 1
        would run without complaint and move KV quotas in ways no figure would reveal."""
        check_common(self)
        check_option("high_util", self.high_util, "within (0, 1]", is_number(self.high_util) and 0 < self.high_util <= 1)
        check_option("low_util", self.low_util, f"within (0, high_util = {self.high_util}]",
                     is_number(self.low_util) and 0 < self.low_util <= self.high_util)

    def quotas(self, view: UnitView) -> dict[str, int]:
        pool = view.kv_blocks_total
        min_blocks = {x.name: blocks_for_tokens(2048, x.chunk_blocks) for x in view.llms}
        if all(x.kv_quota == 0 for x in view.llms) or sum(x.kv_quota for x in view.llms) > pool:
            # First call, or quotas that no longer fit the pool: start again from the rate split.
            weights = {x.name: max(x.placement.rate, 1e-3) * x.chunk_blocks for x in view.llms}
            return proportional_split(pool, weights, min_blocks)
        quotas = {x.name: x.kv_quota for x in view.llms}
        # Donors keep what they use plus headroom; their surplus goes to LLMs whose queue is stuck.
        needy = [x for x in view.llms if x.waiting and (x.kv_used >= self.high_util * x.kv_quota
                 or blocks_for_tokens(x.waiting[0].context_tokens, x.chunk_blocks) > x.kv_quota - x.kv_used)]
        if not needy:
            return quotas
        for x in view.llms:
            if x in needy or x.kv_used >= self.low_util * x.kv_quota:
                continue
            quotas[x.name] = min(quotas[x.name], max(min_blocks[x.name], int(x.kv_used / self.low_util)))
        freed = max(0, pool - sum(quotas.values()))  # what donors gave up, plus any leftovers
        queue = {x.name: float(len(x.waiting)) for x in needy}
        for name, extra in proportional_split(freed, queue, {}).items():
            quotas[name] += extra
        return quotas

    def decide(self, view: UnitView) -> list[Launch]:
        if view.mode == "mixed":
            return self._decide_mixed(view)
        launches: list[Launch] = []
        free = view.sm_units_free
        waits_for_units = False
        prefill_blocks: dict[str, int] = {}  # a decode of the same LLM draws on the same KV slack
        for llm in least_recently_served(view.llms, "prefill"):
            if llm.prefill_busy or not llm.waiting:
                continue
            room = llm.placement.max_batch - len(llm.running)
            batch = admit_fcfs(llm, prefill_slack(llm, view), self.max_prefill_tokens, room)
            if not batch:
                continue  # waiting for cache, not for compute
            units = llm.placement.prefill_units
            if units > free:
                waits_for_units = True
                continue
            launches.append(Launch(llm.name, "prefill", ids(batch), units))
            prefill_blocks[llm.name] = sum(blocks_for_tokens(r.context_tokens, llm.chunk_blocks) for r in batch)
            free -= units
        if waits_for_units:
            return launches
        for llm in least_recently_served(view.llms, "decode"):
            units = llm.placement.decode_units
            if llm.decode_busy or units > free or not has_idle_running(llm):
                continue
            launch = decode_launch(llm, view, units, prefill_blocks.get(llm.name, 0))
            if launch:
                launches.append(launch)
                free -= units
        return launches

    def _decide_mixed(self, view: UnitView) -> list[Launch]:
        launches: list[Launch] = []
        free = view.sm_units_free
        for llm in least_recently_served(view.llms, "decode"):
            units = llm.placement.decode_units
            if llm.decode_busy or units > free:
                continue
            launch = mixed_launch(llm, view, units, self.max_prefill_tokens)
            if launch:
                launches.append(launch)
                free -= units
        return launches


@dataclass
class _Exclusive:
    """Shared shape of the temporal baselines: one job at a time on the whole unit, quota = pool."""

    max_prefill_tokens: int = 2048
    quota_period_s: float = 0.0
    exclusive: bool = True

    def __post_init__(self) -> None:
        check_common(self)

    def quotas(self, view: UnitView) -> dict[str, int]:
        return {x.name: view.kv_blocks_total for x in view.llms}

    def decide(self, view: UnitView) -> list[Launch]:
        if view.sm_units_free < SM_UNITS_FULL or any(x.prefill_busy or x.decode_busy for x in view.llms):
            return []
        for llm, phase in self.order(view):
            launch = self.job(llm, phase, view)
            if launch:
                return [launch]
        return []

    def job(self, llm: LLMView, phase: str, view: UnitView) -> Launch | None:
        if view.mode == "mixed":
            return mixed_launch(llm, view, SM_UNITS_FULL, self.max_prefill_tokens)
        if phase == "prefill":
            room = llm.placement.max_batch - len(llm.running)
            batch = admit_fcfs(llm, prefill_slack(llm, view), self.max_prefill_tokens, room)
            return Launch(llm.name, "prefill", ids(batch), SM_UNITS_FULL) if batch else None
        return decode_launch(llm, view, SM_UNITS_FULL)

    def order(self, view: UnitView) -> Iterable[tuple[LLMView, str]]:
        raise NotImplementedError


@dataclass
class FCFS(_Exclusive):
    """Temporal multiplexing: the earliest waiting request's prefill, else decodes by oldest request."""

    name: str = "fcfs"

    def order(self, view: UnitView) -> Iterator[tuple[LLMView, str]]:
        # A generator: the decodes are only sorted when no prefill could be launched. A lone
        # candidate is not sorted: a key is read even for one (this runs at every decision).
        waiting = [x for x in view.llms if x.waiting]
        if len(waiting) > 1:
            waiting.sort(key=lambda x: age(x.waiting[0]))
        for x in waiting:
            yield x, "prefill"
        decoding = [x for x in view.llms if has_idle_running(x)]
        if len(decoding) > 1:
            decoding.sort(key=lambda x: age(x.running[0]))
        for x in decoding:
            yield x, "decode"


@dataclass
class RoundRobin(_Exclusive):
    """The simplest fair baseline: LLMs take turns, one job each (prefill if it can admit, else decode)."""

    name: str = "round_robin"

    def order(self, view: UnitView) -> list[tuple[LLMView, str]]:
        served = sorted(view.llms, key=lambda x: max(x.prefill_idle_since, x.decode_idle_since))
        return [(x, phase) for x in served for phase in ("prefill", "decode")]


BATCHING_POLICIES = {"adbs": ADBS, "fcfs": FCFS, "round_robin": RoundRobin}
# What a user may set; `name` and `exclusive` say what a policy is, not how it is tuned.
FIXED_FIELDS = ("name", "exclusive")


def make_batching(name: str, **kwargs: object) -> ADBS | FCFS | RoundRobin:
    if name not in BATCHING_POLICIES:
        raise ValueError(f"unknown batching policy {name!r}; known: {', '.join(BATCHING_POLICIES)}")
    return BATCHING_POLICIES[name](**kwargs)  # type: ignore[arg-type]
