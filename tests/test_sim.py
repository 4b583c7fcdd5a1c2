"""The simulator against hand arithmetic, and its invariants as properties."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.batching import make_batching
from policies.cost import InterferenceModel, TableCostModel
from policies.placement import blocks_for_tokens, blocks_per_chunk
from sim import SimulationError, Simulator
from sim.engine import SimUnit
from tests.sim_helpers import SPECS, one_unit, table, workload


def simulate(wl, placement, policy="fcfs", cost=None, **kw):
    return Simulator(wl, placement, make_batching(policy), cost or table(), SPECS, **kw).run()


def test_single_request_matches_hand_arithmetic():
    # prefill 0.1 s, decode 0.01 s/step: first token at 1.1, three decode steps → finish at 1.13.
    res = simulate(workload([("a", 1.0, 10, 4)]), one_unit(["a"]))
    r = res.records.iloc[0]
    assert r.status == "finished"
    assert r.first_token_s == pytest.approx(1.1)
    assert r.finish_s == pytest.approx(1.13)
    assert (r.finish_s - r.first_token_s) / r.output_tokens == pytest.approx(0.0075)


def test_batched_requests_share_prefill_and_decode_steps():
    # Both arrive at 0: one prefill batch (0.1 s), then decode steps together; b has one more token.
    res = simulate(workload([("a", 0.0, 10, 3), ("a", 0.0, 20, 4)]), one_unit(["a"]))
    rec = res.records.sort_values("request_id")
    assert rec.first_token_s.tolist() == pytest.approx([0.1, 0.1])
    assert rec.finish_s.tolist() == pytest.approx([0.12, 0.13])


def test_a_decode_run_goes_through_finishes_when_nothing_waits():
    # One prefill batch, then one decode run of 4 steps in which a (3 tokens) finishes after step 2.
    wl = workload([("a", 0.0, 10, 3), ("a", 0.0, 20, 5)])
    fast = simulate(wl, one_unit(["a"]))
    slow = simulate(wl, one_unit(["a"]), skip_steps=False)
    assert fast.records.sort_values("request_id").finish_s.tolist() == pytest.approx([0.12, 0.14])
    pd.testing.assert_frame_equal(fast.records.sort_values("request_id"), slow.records.sort_values("request_id"))
    # Decisions: at the arrival, after the prefill, after the last job (nothing left); step by step,
    # also after each of the first three decode steps.
    assert (fast.stats["decisions"], slow.stats["decisions"]) == (3, 6)


def test_fcfs_runs_one_job_at_a_time_across_llms():
    # b arrives while a's prefill runs: it waits for it, then goes before a's decodes (prefill first).
    res = simulate(workload([("a", 0.0, 10, 2), ("b", 0.05, 10, 2)]), one_unit(["a", "b"]))
    rec = res.records.set_index("model")
    assert rec.loc["a", "first_token_s"] == pytest.approx(0.1)
    assert rec.loc["b", "first_token_s"] == pytest.approx(0.2)
    assert rec.loc["a", "finish_s"] == pytest.approx(0.21)


def test_fcfs_decodes_the_oldest_request_first_where_round_robin_alternates():
    """MuxServe's temporal baseline is strict FCFS: once both have prefilled (0.1, 0.2), a's two
    decode steps go first because a arrived first (0.21, 0.22), then b's (0.23, 0.24). Round robin
    alternates the LLMs instead: a, b, a, b."""
    wl = workload([("a", 0.0, 10, 3), ("b", 0.05, 10, 3)])
    for policy, finishes in (("fcfs", [0.22, 0.24]), ("round_robin", [0.23, 0.24])):
        rec = simulate(wl, one_unit(["a", "b"]), policy=policy).records.set_index("model")
        assert rec.loc[["a", "b"], "finish_s"].tolist() == pytest.approx(finishes), policy


def test_adbs_overlaps_prefill_of_one_llm_with_decode_of_another():
    # a decodes (40% SM) while b's prefill (80%) runs beside it: a is not delayed by b's prefill.
    res = simulate(workload([("a", 0.0, 10, 20), ("b", 0.15, 10, 2)]), one_unit(["a", "b"]), policy="adbs")
    rec = res.records.set_index("model")
    assert rec.loc["a", "finish_s"] == pytest.approx(0.1 + 19 * 0.01)
    assert rec.loc["b", "first_token_s"] == pytest.approx(0.25)


def test_interference_slows_overlapping_jobs_and_rescales_when_neighbours_change():
    # Prefills at 40% SM, 0.1 s alone, 1.2× slower beside another 40% job (1 + 0.5 · 0.4).
    # a: alone 0–0.05 (half its work), then beside b: 0.05 + 0.05 · 1.2 = 0.11.
    # b: beside a 0.05–0.11 (0.06 / 1.2 = half its work), then alone: 0.11 + 0.05 = 0.16.
    wl = workload([("a", 0.0, 10, 1), ("b", 0.05, 10, 1)])
    slow = InterferenceModel({"prefill": (0.5, 0.0)})
    res = simulate(wl, one_unit(["a", "b"], prefill_sm=40), policy="adbs", interference=slow)
    rec = res.records.set_index("model")
    assert rec.loc["a", "first_token_s"] == pytest.approx(0.11)
    assert rec.loc["b", "first_token_s"] == pytest.approx(0.16)
    assert res.stats["rescaled_jobs"] == 2
    alone = simulate(wl, one_unit(["a", "b"], prefill_sm=40), policy="adbs").records.set_index("model")
    assert alone.loc["b", "first_token_s"] == pytest.approx(0.15)


def test_unplaced_llm_fails_fast_naming_it():
    with pytest.raises(SimulationError, match="ghost"):
        simulate(workload([("ghost", 0.0, 10, 2)]), one_unit(["a"]))


def test_request_too_long_for_the_pool_is_reported_failed_with_reason():
    chunk = blocks_per_chunk(SPECS["llama-7b"])
    res = simulate(workload([("a", 0.0, 100, 100), ("a", 0.1, 10, 2)]),
                   one_unit(["a"], kv_blocks=blocks_for_tokens(64, chunk)))
    rec = res.records.sort_values("request_id")
    assert rec.status.tolist() == ["failed", "finished"]
    assert "KV blocks" in rec.reason.iloc[0]


def test_full_pool_preempts_and_counts_then_finishes_everything():
    chunk = blocks_per_chunk(SPECS["llama-7b"])
    wl = workload([("a", 0.0, 30, 60), ("a", 0.0, 30, 60), ("a", 0.0, 30, 60)])
    res = simulate(wl, one_unit(["a"], kv_blocks=blocks_for_tokens(200, chunk)))
    assert set(res.records.status) == {"finished"}
    assert res.records.preemptions.sum() > 0
    assert res.stats["preemptions"] == res.records.preemptions.sum()


def test_horizon_reports_unfinished_and_later_requests_as_failed():
    wl = workload([("a", 0.0, 10, 500), ("a", 5.0, 10, 2)])
    res = simulate(wl, one_unit(["a"]), horizon_s=1.0)
    rec = res.records.sort_values("request_id")
    assert rec.status.tolist() == ["failed", "failed"]
    assert rec.reason.iloc[0] == "not finished by horizon 1s"
    assert rec.reason.iloc[1] == "not finished by horizon 1s; arrives after the run stopped"


def test_policy_overcommitting_sm_units_is_caught():
    class Greedy:
        name, exclusive, quota_period_s, max_prefill_tokens = "greedy", False, 0.0, 2048

        def quotas(self, view):
            return {x.name: view.kv_blocks_total // len(view.llms) for x in view.llms}

        def decide(self, view):
            from policies.view import Launch
            return [Launch(x.name, "prefill", (x.waiting[0].request_id,), 10) for x in view.llms if x.waiting]

    wl = workload([("a", 0.0, 10, 2), ("b", 0.0, 10, 2)])
    with pytest.raises(SimulationError, match="over-committed SM units"):
        Simulator(wl, one_unit(["a", "b"]), Greedy(), table(), SPECS).run()


# ---- properties -------------------------------------------------------------------------------

requests = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 3, allow_nan=False),
              st.integers(1, 300), st.integers(1, 80)),
    min_size=1, max_size=40,
)
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Checked(Simulator):
    """Checks the budgets after every decision: SM units and KV blocks never over-committed."""

    def _decide(self, unit: SimUnit) -> None:
        super()._decide(unit)
        ledger = unit.ledger
        assert 0 <= ledger.sm_free <= ledger.unit.sm_units
        assert 0 <= ledger.pool.free <= ledger.unit.kv_blocks
        held = [r.blocks for x in ledger.llms.values() for r in [*x.waiting, *x.running]]
        held += [r.blocks for b in ledger.batches for r in b.requests[: b.admitted]]
        assert sum(ledger.pool.used.values()) + ledger.pool.free == ledger.unit.kv_blocks == sum(held) + ledger.pool.free
        if not self.policy.exclusive:
            assert sum(x.kv_quota for x in ledger.llms.values()) <= ledger.unit.kv_blocks
            assert all(ledger.kv_used(x) <= x.kv_quota for x in ledger.llms.values())


def _run(rows, policy, mode, skip, kv_blocks, cost, interference=None):
    wl = workload(rows)
    placement = one_unit(["a", "b", "c"], kv_blocks=kv_blocks, max_batch=8, rates=[3.0, 2.0, 1.0])
    res = Checked(wl, placement, make_batching(policy), cost, SPECS, mode=mode, skip_steps=skip,
                  interference=interference).run()
    return wl, res.records.sort_values("request_id").reset_index(drop=True)


@PROPERTY
@given(rows=requests, policy=st.sampled_from(["adbs", "fcfs", "round_robin"]),
       mode=st.sampled_from(["split", "mixed"]), tight=st.booleans())
def test_every_request_is_reported_exactly_once_and_budgets_hold(rows, policy, mode, tight):
    chunk = blocks_per_chunk(SPECS["llama-7b"])
    kv = blocks_for_tokens(2048, chunk) * (3 if tight else 300)
    wl, rec = _run(rows, policy, mode, True, kv, table(per_token=1e-4))
    assert sorted(rec.request_id) == sorted(wl.df.request_id)
    done = rec[rec.status == "finished"]
    assert (done.first_token_s >= done.arrival_s).all()
    assert (done.finish_s >= done.first_token_s).all()


@PROPERTY
@given(rows=requests, policy=st.sampled_from(["adbs", "fcfs", "round_robin"]),
       mode=st.sampled_from(["split", "mixed"]), tight=st.booleans(), burst=st.booleans(),
       interfere=st.booleans())
def test_skipping_decode_steps_equals_step_by_step(rows, policy, mode, tight, burst, interfere):
    if burst:  # arrivals close together, then none: long runs through finishes with an empty queue
        rows = [(llm, t / 100, prompt, output) for llm, t, prompt, output in rows]
    chunk = blocks_per_chunk(SPECS["llama-7b"])
    kv = blocks_for_tokens(2048, chunk) * (3 if tight else 300)
    cost = table(per_token=1e-4)
    slowdown = InterferenceModel({"prefill": (0.3, 0.5), "decode": (0.2, 1.0), "mixed": (0.1, 0.2)}) if interfere else None
    _, fast = _run(rows, policy, mode, True, kv, cost, slowdown)
    _, slow = _run(rows, policy, mode, False, kv, cost, slowdown)
    pd.testing.assert_frame_equal(fast, slow)


def test_same_seed_gives_identical_records():
    from traces.spec import power_law_spec
    from traces.synthetic import generate

    spec = power_law_spec(["llama-7b"] * 3, 1.0, top_rate=4.0)
    placement = one_unit(["llm-0", "llm-1", "llm-2"], kv_blocks=200_000)
    runs = [simulate(generate(spec, 20, seed=7), placement, policy="adbs", cost=table(per_token=1e-4)).records
            for _ in range(2)]
    pd.testing.assert_frame_equal(runs[0], runs[1])
    assert len(runs[0]) > 20 and not math.isnan(runs[0].finish_s.max())
    other = simulate(generate(spec, 20, seed=8), placement, policy="adbs", cost=table(per_token=1e-4)).records
    assert not np.array_equal(other.finish_s.to_numpy(), runs[0].finish_s.to_numpy())


def test_memory_follows_requests_in_flight_not_trace_length(tmp_path, flush_every=100):
    """Records stream to Parquet and finished requests are dropped, so a trace 8× as long at the
    same rate peaks at about the same memory (beyond the input trace itself, allocated before).

    The bound is absolute: kept in memory, the 3,500 extra records would take about 1 MB, while
    the interpreter's free lists of small objects (tuples, floats: up to about 0.1 MB here, filled
    or emptied by when the garbage collector last ran, so by which tests ran before) move the peak
    of either run. Passing `flush_every` above the trace length makes the test fail."""
    import tracemalloc

    def peak(n: int) -> int:
        rows = [("a", i * 0.5, 50, 20) for i in range(n)]  # one request in flight at a time
        wl = workload(rows)
        tracemalloc.start()
        simulate(wl, one_unit(["a"]), records_path=tmp_path / f"r{n}.parquet", records_flush_every=flush_every)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert pd.read_parquet(tmp_path / f"r{n}.parquet")["status"].eq("finished").sum() == n
        return top

    short, long = peak(500), peak(4_000)
    assert long < short + 300_000, (short, long)


A100_TABLE = Path(__file__).parents[2] / "shared" / "data" / "muxserve_llama_a100.json"


@pytest.mark.skipif(not A100_TABLE.exists(), reason="MuxServe's A100 table is not in ../shared/data")
@pytest.mark.parametrize("interfere", [False, True])
def test_skipping_equals_step_by_step_on_the_measured_table_and_the_paper_workload(interfere):
    """The constant tables above make step latencies linear in context; the measured one bends and
    is extrapolated, and 19 LLMs on 32 GPUs colocate several per unit under ADBS."""
    from experiments.systems import run_system
    from policies.specs import ClusterSpec
    from traces.spec import muxserve_synthetic
    from traces.synthetic import generate

    wl = generate(muxserve_synthetic(0.7, 1.0), 4, seed=3)
    slowdown = InterferenceModel({"prefill": (0.3, 0.5), "decode": (0.2, 1.0)}) if interfere else None
    runs = [run_system("muxserve", wl, ClusterSpec(4, 8), TableCostModel.from_muxserve_json(A100_TABLE),
                       skip_steps=skip, interference=slowdown) for skip in (True, False)]
    fast, slow = (r.records.sort_values("request_id").reset_index(drop=True) for r in runs)
    pd.testing.assert_frame_equal(fast, slow)
    assert (fast.status == "finished").all() and runs[0].stats["decisions"] < runs[1].stats["decisions"]
    assert (runs[0].stats.get("rescaled_jobs", 0) > 0) == interfere


def test_mixed_step_pays_the_step_fixed_cost_once() -> None:
    """A mixed step is one forward pass: prefill + decode − a one-request decode, never below either part."""
    from policies.cost import mixed_step_time

    class Linear:  # a step's fixed 5 ms plus 1 ms per decoded request or 0.1 ms per prompt token
        def prefill_time(self, model: object, tp: int, sm_pct: int, batch: int, seq_len: float) -> float:
            return 5.0 + 0.1 * batch * seq_len

        def decode_time(self, model: object, tp: int, sm_pct: int, batch: int, ctx: float) -> float:
            return 5.0 + batch

    cost, spec = Linear(), object()
    assert mixed_step_time(cost, spec, 1, 100, 2, 50.0, 4, 64.0) == 5.0 + 10.0 + 4.0 - 1.0  # fixed cost once
    assert mixed_step_time(cost, spec, 1, 100, 2, 50.0, 0, 0.0) == 15.0  # a prefill alone
    assert mixed_step_time(cost, spec, 1, 100, 0, 0.0, 4, 64.0) == 9.0  # a decode alone
    assert mixed_step_time(cost, spec, 1, 100, 1, 50.0, 1, 64.0) == 10.0  # one decode adds nothing to a prefill


@PROPERTY
@given(rows=requests, policy=st.sampled_from(["adbs", "fcfs", "round_robin"]), mode=st.sampled_from(["split", "mixed"]))
def test_the_job_log_holds_every_token_and_single_steps_take_what_the_profile_says(rows, policy, mode):
    """One row per job, every request admitted in exactly one of them (no preemption here: the pool
    is ample), and with no runner terms or interference each single-step job lasts exactly what
    `profiled_job_time` gives for it: the yardstick `experiments.validate` reads hardware jobs against."""
    from policies.cost import profiled_job_time

    cost = table(per_token=1e-4)
    wl = workload(rows)
    res = Simulator(wl, one_unit(["a", "b", "c"], max_batch=8), make_batching(policy), cost, SPECS, mode=mode,
                    log_jobs=True).run()
    jobs = res.jobs
    done = res.records[res.records.status == "finished"]
    assert len(jobs) == res.stats["jobs"]
    assert jobs.admitted.sum() == len(done) == len(wl.df)
    assert (jobs.start_s <= jobs.first_end_s).all() and (jobs.first_end_s <= jobs.end_s).all()
    single = jobs[jobs.steps == 1]
    profiled = [profiled_job_time(cost, SPECS[j.model], j.tp, j.sm_pct, j.admitted, j.admitted_context, j.decoding,
                                  j.decoding_context) for j in single.itertuples()]
    assert np.allclose(single.end_s - single.start_s, profiled, rtol=1e-9, atol=1e-12)


def test_without_log_jobs_no_log_is_kept():
    assert simulate(workload([("a", 1.0, 10, 4)]), one_unit(["a"])).jobs is None
