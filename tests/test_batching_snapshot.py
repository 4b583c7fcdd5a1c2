"""Issue 3's snapshot properties. A decision partitions its snapshot: every waiting request is
launched or left waiting, never both or lost, and a job only takes requests from the queue its phase
serves. Quotas never exceed the pool.

The policies are pure functions of a read-only view, so "lost" would mean a policy reached into the
executor's queues; the test takes the queues' contents before and after the decision to rule it out.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.batching import make_batching
from policies.view import UnitView
from tests.test_batching import unit_views, with_quotas


def queues(view: UnitView) -> dict[str, tuple[list[int], list[int]]]:
    return {x.name: ([r.request_id for r in x.waiting], [r.request_id for r in x.running]) for x in view.llms}


@settings(max_examples=150, deadline=None)
@given(view=unit_views(), name=st.sampled_from(["adbs", "fcfs", "round_robin"]))
def test_every_request_is_launched_or_left_waiting_never_both_or_lost(view: UnitView, name: str) -> None:
    policy = make_batching(name)
    view = with_quotas(view, policy.quotas(view))
    before = queues(view)
    launches = policy.decide(view)
    assert queues(view) == before  # the snapshot is read, never taken from
    for llm, (waiting, running) in before.items():
        mine = [launch for launch in launches if launch.llm == llm]
        admitted = [i for launch in mine if launch.phase != "decode" for i in launch.request_ids if i in waiting]
        stepped = [i for launch in mine for i in launch.request_ids if i not in waiting]
        left = [i for i in waiting if i not in admitted]
        assert sorted(admitted + left) == sorted(waiting) and len(set(admitted)) == len(admitted)
        assert set(stepped) <= set(running)  # anything not waiting must already be running
        for launch in mine:
            if launch.phase == "prefill":
                assert set(launch.request_ids) <= set(waiting)
            if launch.phase == "decode":
                assert set(launch.request_ids) <= set(running)
            assert set(launch.preempt) <= set(running)


@settings(max_examples=150, deadline=None)
@given(view=unit_views(), name=st.sampled_from(["adbs", "fcfs", "round_robin"]))
def test_quotas_never_exceed_the_pool(view: UnitView, name: str) -> None:
    """Each quota fits the pool. A policy that runs several jobs at once must also partition it;
    one job at a time (fcfs, round_robin) may give each LLM the whole pool, since the pool's free
    count then bounds what their requests hold together."""
    policy = make_batching(name)
    for _ in range(2):  # the first split, then one adaptation from it
        quotas = policy.quotas(view)
        assert set(quotas) == {x.name for x in view.llms}
        assert all(0 <= q <= view.kv_blocks_total for q in quotas.values())
        assert policy.exclusive or sum(quotas.values()) <= view.kv_blocks_total
        view = with_quotas(view, quotas)
