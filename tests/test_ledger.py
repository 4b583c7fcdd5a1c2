"""The unit ledger on its own, without time: hand-checked steps and hypothesis-driven sequences of
arrivals, policy decisions and job ends in any order."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from policies.batching import make_batching
from policies.ledger import BlockPool, LedgerError, UnitLedger, steps_within_kv
from policies.placement import blocks_for_tokens, blocks_per_chunk
from policies.records import RecordWriter
from policies.view import Launch, Request
from tests.sim_helpers import SPECS, one_unit

CHUNKS = {m: blocks_per_chunk(s) for m, s in SPECS.items()}
CHUNK = CHUNKS["llama-7b"]


def ledger_of(names=("a",), kv_blocks=10**6, mode="split", exclusive=False, pool=None, max_batch=64):
    unit = one_unit(list(names), kv_blocks=kv_blocks, max_batch=max_batch).units[0]
    return UnitLedger(unit, SPECS, CHUNKS, mode, exclusive, RecordWriter(), pool)


def check_pool(ledger: UnitLedger) -> None:
    """The pool's counts equal what the requests on the unit hold, and nothing is over-committed."""
    held: dict[str, int] = {name: 0 for name in ledger.llms}
    seen: set[int] = set()
    for name, llm in ledger.llms.items():
        assert llm.running_ids == [r.request_id for r in llm.running]
        assert llm.running_busy == sum(r.busy for r in llm.running)
        for r in [*llm.waiting, *llm.running]:
            assert r.request_id not in seen
            seen.add(r.request_id)
            held[name] += r.blocks
    for batch in ledger.batches:
        for r in batch.requests[: batch.admitted]:
            assert r.request_id not in seen
            seen.add(r.request_id)
            held[r.llm] += r.blocks
    assert ledger.pool.used == held
    assert ledger.pool.free == ledger.pool.total - sum(held.values())
    assert ledger.pool.free >= 0
    if not ledger.exclusive:
        assert all(ledger.kv_used(x) <= x.kv_quota for x in ledger.llms.values())
    assert 0 <= ledger.sm_free <= ledger.unit.sm_units


def test_arrival_is_checked_against_the_context_limit_passed_in():
    ledger = ledger_of()
    assert not ledger.arrive(Request(0, "a", 0.0, 900, 200), context_limit=1024)
    assert ledger.arrive(Request(1, "a", 0.0, 900, 200), context_limit=2048)
    huge = ledger_of(kv_blocks=blocks_for_tokens(1000, CHUNK))
    assert not huge.arrive(Request(2, "a", 0.0, 1000, 100), context_limit=4096)
    records = ledger.writer.close()
    assert records.reason.tolist() == ["prompt+output 1100 tokens exceeds llama-7b context 1024"]
    assert huge.writer.close().reason.tolist() == [f"needs {blocks_for_tokens(1100, CHUNK)} KV blocks, unit pool "
                                                   f"has {blocks_for_tokens(1000, CHUNK)}"]


def test_a_prefill_takes_its_context_blocks_and_the_end_gives_the_first_token():
    ledger = ledger_of()
    ledger.set_quotas({"a": 10**6}, "test")
    ledger.arrive(Request(0, "a", 0.0, 40, 3), 4096)
    batch = ledger.apply(Launch("a", "prefill", (0,), 8), "test")
    assert (batch.admitted, batch.admitted_context, batch.min_left) == (1, 40, 3)
    assert ledger.pool.free == 10**6 - blocks_for_tokens(40, CHUNK)
    check_pool(ledger)
    ledger.end(batch, 1, first_token_s=0.1, end_s=0.1)
    r = ledger.llms["a"].running[0]
    assert (r.generated, r.first_token_s, r.busy) == (1, 0.1, False)
    # Two decode steps as one run: blocks of the last step's context (42 tokens) taken first.
    run = ledger.apply(Launch("a", "decode", (0,), 4), "test")
    ledger.hold_for_steps(run, 2)
    assert r.blocks == blocks_for_tokens(42, CHUNK)
    ledger.end(run, 2, first_token_s=math.nan, end_s=0.3)
    assert ledger.pool.free == 10**6 and not ledger.has_requests()
    rec = ledger.writer.close()
    assert rec[["status", "first_token_s", "finish_s"]].values.tolist() == [["finished", 0.1, 0.3]]


def test_preemption_gives_back_exactly_what_was_held_and_requeues_by_age():
    ledger = ledger_of()
    ledger.set_quotas({"a": 10**6}, "test")
    for i, prompt in enumerate((100, 300, 500)):
        ledger.arrive(Request(i, "a", float(i), prompt, 10), 4096)
    ledger.end(ledger.apply(Launch("a", "prefill", (0, 1, 2), 8), "test"), 1, 0.1, 0.1)
    free = ledger.pool.free
    held = {r.request_id: r.blocks for r in ledger.llms["a"].running}
    batch = ledger.apply(Launch("a", "decode", (0,), 4, preempt=(2, 1)), "test")
    assert ledger.pool.free == free + held[1] + held[2]  # request 0 crosses no block boundary here
    assert [r.request_id for r in ledger.llms["a"].waiting] == [1, 2]
    assert all(r.blocks == 0 and r.preemptions == 1 for r in ledger.llms["a"].waiting)
    check_pool(ledger)
    with pytest.raises(LedgerError, match="not idle-running"):
        ledger.apply(Launch("a", "prefill", (1,), 8, preempt=(0,)), "test")  # 0 is in the decode job
    ledger.end(batch, 1, math.nan, 0.2)


def test_over_commits_raise_and_leave_every_request_recordable():
    ledger = ledger_of(kv_blocks=blocks_for_tokens(64, CHUNK))
    ledger.set_quotas({"a": blocks_for_tokens(64, CHUNK)}, "test")
    ledger.arrive(Request(0, "a", 0.0, 40, 3), 4096)
    ledger.arrive(Request(1, "a", 0.0, 40, 3), 4096)
    with pytest.raises(LedgerError, match="over-committed KV blocks"):
        ledger.apply(Launch("a", "prefill", (0, 1), 8), "test")
    with pytest.raises(LedgerError, match="over-committed SM units"):
        ledger.apply(Launch("a", "decode", (), 99), "test")
    with pytest.raises(LedgerError, match="unknown, busy or repeated"):
        ledger_of().apply(Launch("a", "prefill", (7,), 8), "test")
    ledger.fail_leftovers("stopped")
    assert sorted(ledger.writer.close().request_id) == [0, 1]
    assert ledger.pool.free == ledger.pool.total


class IdPool(BlockPool):
    """A pool that hands out block ids, as a shared-memory paged cache would: the extension point."""

    def __init__(self, total: int, llms) -> None:
        super().__init__(total, llms)
        self.free_ids = list(range(total))
        self.tables: dict[int, list[int]] = {}

    def resize(self, r: Request, blocks: int) -> None:
        table = self.tables.setdefault(r.request_id, [])
        while len(table) < blocks:
            table.append(self.free_ids.pop())
        while len(table) > blocks:
            self.free_ids.append(table.pop())
        if not table:
            del self.tables[r.request_id]
        super().resize(r, blocks)


# ---- properties -----------------------------------------------------------------------------------

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
arrivals = st.lists(st.tuples(st.sampled_from("ab"), st.integers(1, 200), st.integers(1, 70)), min_size=1,
                    max_size=25)


@PROPERTY
@given(rows=arrivals, policy=st.sampled_from(["adbs", "fcfs", "round_robin"]),
       mode=st.sampled_from(["split", "mixed"]), tight=st.booleans(), ids=st.booleans(), data=st.data())
def test_any_order_of_events_loses_nothing_and_never_over_commits(rows, policy, mode, tight, ids, data):
    """Arrivals, decisions and job ends (one step or a run of several, through finishes) in an order
    hypothesis draws: the pool always equals what requests hold, budgets hold, and every request
    is recorded exactly once."""
    batching = make_batching(policy)
    kv = blocks_for_tokens(300, CHUNK) * (2 if tight else 50)
    pool = IdPool(kv, ("a", "b")) if ids else None
    ledger = ledger_of(("a", "b"), kv_blocks=kv, mode=mode, exclusive=batching.exclusive, pool=pool, max_batch=6)
    ledger.set_quotas(batching.quotas(ledger.view(0.0)), policy)
    requests = [Request(i, llm, float(i), prompt, output) for i, (llm, prompt, output) in enumerate(rows)]
    pending, now = list(requests), 0.0
    for _ in range(150):
        now += 1.0
        choices = ["decide"] + (["arrive"] if pending else []) + (["end"] if ledger.batches else [])
        op = data.draw(st.sampled_from(choices))
        if op == "arrive":
            ledger.arrive(pending.pop(0), context_limit=240)
        elif op == "decide":
            for launch in batching.decide(ledger.view(now)):
                if launch.preempt:
                    event("preemption")
                ledger.apply(launch, policy)
                check_pool(ledger)
        else:
            batch = data.draw(st.sampled_from(sorted(ledger.batches, key=lambda b: b.llm.name + b.phase)))
            steps = 1
            if not batch.admitted and batch.requests:  # a decode: maybe a run, through finishes
                contexts = [r.context_tokens for r in batch.requests]
                left = [r.remaining_tokens for r in batch.requests]
                fit = steps_within_kv(contexts, left, max(left), ledger.slack(batch.llm) // batch.llm.chunk_blocks)
                steps = data.draw(st.integers(1, fit))
                early = sorted(((now + n, r) for n, r in zip(left, batch.requests, strict=True) if n < steps),
                               key=lambda x: x[0])
                event(f"decode run of {'several' if steps > 1 else 'one'} step(s)")
                if early:
                    event("a run went through a finish")
                ledger.finish_early(batch, early)
                ledger.hold_for_steps(batch, steps)
                check_pool(ledger)
            ledger.end(batch, steps, now, now + steps)
        check_pool(ledger)
        if not pending and not ledger.has_requests():
            break
    ledger.fail_leftovers("stopped")
    assert ledger.pool.free == kv and sum(ledger.pool.used.values()) == 0
    if ids:
        assert sorted(pool.free_ids) == list(range(kv)) and not pool.tables
    records = ledger.writer.close()
    arrived = [r.request_id for r in requests if r not in pending]
    assert sorted(records.request_id) == sorted(arrived)  # each arrived request once, none invented
    done = records[records.status == "finished"]
    event(f"{'some' if len(done) else 'no'} request finished")
    by_id = {r.request_id: r for r in requests}
    assert all(by_id[i].generated == by_id[i].output_tokens for i in done.request_id)


@PROPERTY
@given(contexts=st.lists(st.integers(1, 300), min_size=1, max_size=8), data=st.data())
def test_steps_within_kv_is_the_longest_run_whose_growth_fits(contexts, data):
    left = data.draw(st.lists(st.integers(1, 120), min_size=len(contexts), max_size=len(contexts)))
    max_steps = data.draw(st.integers(1, 120))
    chunks = data.draw(st.integers(0, 12))

    def growth(s: int) -> int:  # chunks step s adds for the requests still in the run
        return sum(blocks_for_tokens(c + s, 1) - blocks_for_tokens(c + s - 1, 1)
                   for c, n in zip(contexts, left, strict=True) if s < n)

    # Blocks of requests that finished are not counted back: the growth adds up over the steps.
    total, brute = 0, max_steps
    for s in range(1, max_steps):
        total += growth(s)
        if total > chunks:
            brute = s
            break
    assert steps_within_kv(contexts, left, max_steps, chunks) == brute
