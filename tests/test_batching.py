"""Batching policies on random snapshots: nothing launched twice or lost, quotas within the pool."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.batching import make_batching
from policies.placement import LLMPlacement, blocks_for_tokens, blocks_per_chunk
from policies.specs import MODEL_PRESETS
from policies.view import LLMView, ReadOnlyQueue, Request, UnitView, age

CHUNK = blocks_per_chunk(MODEL_PRESETS["llama-7b"])


@st.composite
def unit_views(draw):
    n = draw(st.integers(1, 4))
    pool = draw(st.integers(1, 200)) * CHUNK
    mode = draw(st.sampled_from(["split", "mixed"]))
    rid = iter(range(10**6))
    llms, used_total = [], 0
    for i in range(n):
        waiting = [Request(next(rid), f"m{i}", draw(st.floats(0, 10)), draw(st.integers(1, 600)), 10)
                   for _ in range(draw(st.integers(0, 5)))]
        waiting.sort(key=lambda r: r.arrival_s)
        running = []
        for _ in range(draw(st.integers(0, 5))):
            r = Request(next(rid), f"m{i}", draw(st.floats(0, 10)), draw(st.integers(1, 600)), 10, generated=1)
            r.blocks = blocks_for_tokens(r.prompt_tokens, CHUNK)
            if used_total + r.blocks > pool:
                break
            used_total += r.blocks
            running.append(r)
        running.sort(key=age)  # executors keep running requests oldest first
        place = LLMPlacement(f"m{i}", "llama-7b", 1, 80, draw(st.sampled_from([30, 40, 50])),
                             draw(st.integers(1, 8)), rate=draw(st.floats(0.1, 5)))
        busy = draw(st.booleans())
        llms.append(LLMView(place, CHUNK, ReadOnlyQueue(waiting), ReadOnlyQueue(running),
                            ReadOnlyQueue([r.request_id for r in running]), busy and mode == "split",
                            False, sum(r.blocks for r in running), 0))
    free_units = draw(st.integers(0, 12))
    return UnitView(0, 0.0, mode, 12, free_units, pool, pool - used_total, tuple(llms))


def with_quotas(view: UnitView, quotas: dict[str, int]) -> UnitView:
    llms = tuple(LLMView(x.placement, x.chunk_blocks, x.waiting, x.running, x.running_ids, x.prefill_busy,
                         x.decode_busy,
                         x.kv_used, max(quotas[x.name], x.kv_used)) for x in view.llms)
    return UnitView(view.unit_id, view.now, view.mode, view.sm_units_total, view.sm_units_free,
                    view.kv_blocks_total, view.kv_blocks_free, llms)


@settings(max_examples=150, deadline=None)
@given(view=unit_views(), name=st.sampled_from(["adbs", "fcfs", "round_robin"]))
def test_each_request_launched_at_most_once_and_within_budgets(view, name):
    policy = make_batching(name)
    quotas = policy.quotas(view)
    if not policy.exclusive:
        assert sum(quotas.values()) <= view.kv_blocks_total
    view = with_quotas(view, quotas)
    launches = policy.decide(view)
    launched = [rid for launch in launches for rid in launch.request_ids]
    assert len(launched) == len(set(launched))
    assert sum(launch.sm_units for launch in launches) <= view.sm_units_free
    known = {r.request_id for x in view.llms for r in [*x.waiting, *x.running]}
    assert set(launched) <= known
    for launch in launches:
        llm = next(x for x in view.llms if x.name == launch.llm)
        mine = {r.request_id for r in [*llm.waiting, *llm.running]}
        assert set(launch.request_ids) <= mine and not set(launch.preempt) & set(launch.request_ids)
    if policy.exclusive:
        assert len(launches) <= 1
    assert_kv_fits(view, launches)


def assert_kv_fits(view: UnitView, launches) -> None:
    """All launches of one decision together fit each LLM's quota slack and the pool's free blocks
    (a prefill and a decode of the same LLM draw on the same slack)."""
    pool_taken = 0
    for x in view.llms:
        by_id = {r.request_id: r for r in [*x.waiting, *x.running]}
        mine = [launch for launch in launches if launch.llm == x.name]
        grown = sum(blocks_for_tokens(by_id[i].context_tokens, x.chunk_blocks) - by_id[i].blocks
                    for launch in mine for i in launch.request_ids)
        freed = sum(by_id[i].blocks for launch in mine for i in launch.preempt)
        assert grown - freed <= x.kv_quota - x.kv_used, (x.name, grown, freed)
        pool_taken += grown - freed
    assert pool_taken <= view.kv_blocks_free


@settings(max_examples=100, deadline=None)
@given(view=unit_views())
def test_adbs_quota_adaptation_stays_within_pool(view):
    policy = make_batching("adbs")
    view = with_quotas(view, policy.quotas(view))
    adapted = policy.quotas(view)
    assert sum(adapted.values()) <= view.kv_blocks_total
    assert all(adapted[x.name] >= 0 for x in view.llms)


@pytest.mark.parametrize(("quota_chunks", "phases"), [(3, ["decode"]), (4, ["prefill", "decode"])])
def test_adbs_prefill_leaves_the_running_requests_their_next_block(quota_chunks, phases):
    """A prefill and a decode of one LLM draw on one KV slack. The prefill (2 chunks) is admitted
    only if the running request's next step (1 more chunk) still fits after it; otherwise the decode
    would have to preempt, and the two would evict each other in turn."""
    waiting = [Request(1, "m0", 1.0, 40, 10)]  # needs 2 chunks
    running = Request(0, "m0", 0.0, 32, 10, generated=1)  # context 33: grows to 2 chunks
    running.blocks = CHUNK
    place = LLMPlacement("m0", "llama-7b", 1, 50, 50, 8, rate=1.0)
    llm = LLMView(place, CHUNK, ReadOnlyQueue(waiting), ReadOnlyQueue([running]), ReadOnlyQueue([0]), False, False,
                  CHUNK, quota_chunks * CHUNK)
    view = UnitView(0, 0.0, "split", 12, 12, 10 * CHUNK, 9 * CHUNK, (llm,))
    launches = make_batching("adbs").decide(view)
    assert [launch.phase for launch in launches] == phases
    assert_kv_fits(view, launches)
