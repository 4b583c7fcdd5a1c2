"""The simulator's model of the CPU runner's core slices: launches on busy cores take turns."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.batching import make_batching
from policies.cost import FirstSteps, RunnerTerms
from policies.placement import blocks_for_tokens, blocks_per_chunk
from sim import SimulationError, Simulator
from tests.sim_helpers import SPECS, one_unit, table, workload
from tests.test_sim import PROPERTY, Checked, requests

# a and c pinned to the same core, b to its own: a and c take turns, b runs beside either.
SLICES = {"a": (0,), "b": (1,), "c": (0,)}


def simulate(wl, slices=SLICES, skip=True, policy="adbs", kv_blocks=10**6, cost=None, terms=None):
    placement = one_unit(["a", "b", "c"], kv_blocks=kv_blocks, max_batch=8, rates=[3.0, 2.0, 1.0])
    sim = Checked(wl, placement, make_batching(policy), cost or table(), SPECS, mode="mixed", skip_steps=skip,
                  core_slices=slices, runner_terms=terms)
    res = sim.run()
    return res.records.sort_values("request_id").reset_index(drop=True), res.stats


def test_llms_on_one_core_alternate_step_by_step_and_others_run_beside_them():
    # Mixed steps: prefill 0.1 s, decode 0.01 s. a starts at 0; c's launch at 0 waits for a's step,
    # then each one's next step waits for the other's: a 0–0.1, c 0.1–0.2, a 0.2–0.21, c 0.21–0.22.
    rec, stats = simulate(workload([("a", 0.0, 10, 2), ("b", 0.0, 10, 2), ("c", 0.0, 10, 2)]))
    times = rec.set_index("model")[["first_token_s", "finish_s"]]
    assert times.loc["a"].tolist() == pytest.approx([0.1, 0.21])
    assert times.loc["c"].tolist() == pytest.approx([0.2, 0.22])
    assert times.loc["b"].tolist() == pytest.approx([0.1, 0.11])  # its own core: never waits
    assert stats["deferred_launches"] == 3  # c at 0, a at 0.1, c at 0.2


def test_disjoint_slices_change_nothing():
    wl = workload([("a", 0.0, 10, 5), ("b", 0.05, 30, 3), ("c", 0.2, 10, 4)])
    apart, _ = simulate(wl, slices={"a": (0,), "b": (1,), "c": (2,)})
    plain = Simulator(wl, one_unit(["a", "b", "c"], max_batch=8, rates=[3.0, 2.0, 1.0]), make_batching("adbs"),
                      table(), SPECS, mode="mixed").run().records.sort_values("request_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(apart, plain)


# Beside another engine, steps slow by 1.5× at one token to 1.1× at 100 and more.
BESIDE = RunnerTerms(beside={("llama-7b", 1): ((1, 1.5), (100, 1.1))}, label="test")


@PROPERTY
@given(rows=requests, policy=st.sampled_from(["adbs", "fcfs"]), tight=st.booleans(), beside=st.booleans())
def test_turn_taking_skips_decode_steps_exactly_and_reports_every_request(rows, policy, tight, beside):
    """Also with the beside factor rescaled as engines start and stop (`Simulator._rebeside`)."""
    kv = blocks_for_tokens(2048, blocks_per_chunk(SPECS["llama-7b"])) * (3 if tight else 300)
    wl = workload(rows)
    terms = BESIDE if beside else None
    fast, _ = simulate(wl, skip=True, policy=policy, kv_blocks=kv, cost=table(per_token=1e-4), terms=terms)
    slow, _ = simulate(wl, skip=False, policy=policy, kv_blocks=kv, cost=table(per_token=1e-4), terms=terms)
    pd.testing.assert_frame_equal(fast, slow)
    assert sorted(fast.request_id) == sorted(wl.df.request_id)


def test_split_mode_slices_are_per_phase():
    """Split mode (hwloop.split_runner): each LLM's prefill and decode process has its own cores,
    keyed "<LLM>/<phase>". Both prefills on core 0 take turns; a's decode on core 1 runs beside b's
    prefill. Prefill 0.1 s, decode 0.01 s: a prefills 0–0.1 and decodes 0.1–0.11; b's prefill waits
    for a's (0.1–0.2), then decodes 0.2–0.21."""
    placement = one_unit(["a", "b"], prefill_sm=50, decode_sm=50, max_batch=8, rates=[2.0, 1.0])
    slices = {"a/prefill": (0,), "a/decode": (1,), "b/prefill": (0,), "b/decode": (1,)}
    wl = workload([("a", 0.0, 10, 2), ("b", 0.0, 10, 2)])
    res = Checked(wl, placement, make_batching("adbs"), table(), SPECS, mode="split", core_slices=slices).run()
    times = res.records.set_index("model")[["first_token_s", "finish_s"]]
    assert times.loc["a"].tolist() == pytest.approx([0.1, 0.11])
    assert times.loc["b"].tolist() == pytest.approx([0.2, 0.21])
    assert res.stats["deferred_launches"] == 1


def test_runner_terms_charge_each_first_step_by_what_came_before_it_on_its_cores():
    """The measured runner terms (policies.cost.RunnerTerms) on the first test's trace, with dispatch
    1 ms per launch, 2 ms more when it admits, 5 ms for a turn after another engine on the same
    cores, and 4 ms for an engine idle at least 50 ms (never run counts as idle):
    a  0     → 0.107 (dispatch + admit + idle), then its decode waits for c: 0.215 → 0.231 (+ turn);
    b  0     → 0.107, decode 0.107 → 0.118 (dispatch only: back to back on its own core);
    c  0.107 → 0.215 (dispatch + admit + turn after a), decode 0.231 → 0.247 (+ turn after a)."""
    terms = RunnerTerms(turn_s={("llama-7b", 1): 0.005}, idle_s={("llama-7b", 1): ((0.05, 0.004),)},
                        dispatch_s={("llama-7b", 1): 0.001}, admit_s={("llama-7b", 1): 0.002}, label="test")
    wl = workload([("a", 0.0, 10, 2), ("b", 0.0, 10, 2), ("c", 0.0, 10, 2)])
    placement = one_unit(["a", "b", "c"], max_batch=8, rates=[3.0, 2.0, 1.0])
    res = Checked(wl, placement, make_batching("adbs"), table(), SPECS, mode="mixed", core_slices=SLICES,
                  runner_terms=terms).run()
    times = res.records.set_index("model")[["first_token_s", "finish_s"]]
    assert times.loc["a"].tolist() == pytest.approx([0.107, 0.231])
    assert times.loc["b"].tolist() == pytest.approx([0.107, 0.118])
    assert times.loc["c"].tolist() == pytest.approx([0.215, 0.247])
    assert res.stats["turn_starts"] == 3
    assert res.stats["runner_extra_s"] == pytest.approx(0.007 * 2 + 0.001 + 0.008 + 0.006 * 2)
    with pytest.raises(SimulationError, match="core_slices"):
        Simulator(wl, placement, make_batching("adbs"), table(), SPECS, mode="mixed", runner_terms=terms)


def test_runner_terms_read_from_measurements_interpolate_the_idle_extra_over_log_gap():
    """Idle extras 0.5 ms at 2 ms and 3 ms at 0.2 s: linear from none up to the shortest gap, linear in
    log(gap) between, the longest's beyond; after another engine, the larger of turn and idle."""
    measured = [{"model": "m", "cores": 1, "turns": {"extra_ms": 2.0},
                 "idle": {"gaps": [{"gap_s": 0.2, "extra_ms": 3.0}, {"gap_s": 0.002, "extra_ms": 0.5}]},
                 "dispatch": {"decode_ms": 0.3, "admit_ms": 1.0}}]
    terms = RunnerTerms.from_measured(measured, "test")
    extra = lambda **kw: terms.first_step_extra("m", 1, **kw)  # noqa: E731
    assert extra(after_other=True, idle_for=0.0, admitting=False) == pytest.approx(0.0023)  # turn, back to back
    assert extra(after_other=True, idle_for=10.0, admitting=False) == pytest.approx(0.0033)  # idle beats turn
    assert extra(after_other=True, idle_for=0.02, admitting=False) == pytest.approx(0.0023)  # 1.75 ms idle < turn
    assert extra(after_other=False, idle_for=0.001, admitting=False) == pytest.approx(0.00055)
    assert extra(after_other=False, idle_for=0.02, admitting=False) == pytest.approx(0.00205)  # halfway in log
    assert extra(after_other=False, idle_for=float("inf"), admitting=False) == pytest.approx(0.0033)
    assert terms.first_step_extra("m", 2, after_other=True, idle_for=1.0, admitting=True) == 0.0  # not measured
    measured[0]["turns"]["extra_ms"] = -1.0  # a cost measured below zero is noise: charged as none
    assert RunnerTerms.from_measured(measured, "test").turn_s[("m", 1)] == 0.0


def test_first_steps_time_idleness_by_the_cores_not_the_worker():
    """A worker whose own last job ended long ago, but whose core another worker left just now, starts
    after a turn with its core idle only since then."""
    terms = RunnerTerms(turn_s={("m", 1): 0.001}, idle_s={("m", 1): ((0.01, 0.002), (1.0, 0.004))}, label="test")
    steps = FirstSteps(terms)
    assert steps.start("a", (0,), 0.0, "m", 1, admitting=False) == (pytest.approx(0.004), False)  # never ran
    steps.end((0,), 0.1)
    steps.start("b", (0,), 5.0, "m", 1, admitting=False)
    steps.end((0,), 5.2)
    assert steps.start("a", (0,), 5.2, "m", 1, admitting=False) == (pytest.approx(0.001), True)  # turn only
    steps.end((0,), 5.3)
    assert steps.start("a", (0,), 5.4, "m", 1, admitting=False) == (pytest.approx(0.003), False)  # 0.1 s idle


def first_tokens_and_finishes(terms: RunnerTerms, rows: list[tuple[str, float, int, int]]):
    """[first token, finish] per request in id order, and the result, on SLICES with `terms`."""
    placement = one_unit(["a", "b", "c"], max_batch=8, rates=[3.0, 2.0, 1.0])
    res = Checked(workload(rows), placement, make_batching("adbs"), table(), SPECS, mode="mixed",
                  core_slices=SLICES, runner_terms=terms).run()
    return res.records.sort_values("request_id")[["first_token_s", "finish_s"]].to_numpy().tolist(), res


def test_a_step_shape_new_to_its_engine_is_charged_once_per_engine():
    """`shape_s` (hwloop.terms shapes) charges a step whose token count its worker never ran: a's
    first request prefills 10 tokens (new: 0.1 + 0.01) and decodes 1 (new: 0.01 + 0.01), ending at
    0.13; its second request, alike and after a's idle second, runs both counts again (no extra):
    1.0 → 1.1 → 1.11. b's first steps are new to b's own worker: its 10-token prefill is charged."""
    terms = RunnerTerms(shape_s={("llama-7b", 1): ((1, 0.01), (100, 0.01))}, label="test")
    times, res = first_tokens_and_finishes(terms, [("a", 0.0, 10, 2), ("a", 1.0, 10, 2), ("b", 1.0, 10, 2)])
    assert times == [pytest.approx([0.11, 0.13]), pytest.approx([1.1, 1.11]), pytest.approx([1.11, 1.13])]
    assert res.stats["runner_extra_s"] == pytest.approx(0.04)


def test_a_prefill_padded_to_a_shape_its_engine_ran_is_not_charged_as_new():
    """With the engine padding prefills to 16 tokens (`prefill_pad`), a's second request (12 tokens)
    runs the first one's padded shape (10 → 16): only its decode of one is new to nothing; a 20-token
    prompt would have been (32). Decodes are not padded."""
    terms = RunnerTerms(shape_s={("llama-7b", 1): ((1, 0.01), (100, 0.01))}, label="test",
                        prefill_pad={("llama-7b", 1): 16})
    assert [terms.prefill_shape("llama-7b", 1, n) for n in (1, 16, 17, 20)] == [16, 16, 32, 32]
    assert terms.prefill_shape("other", 1, 17) == 17  # an engine that was not measured: no padding
    times, res = first_tokens_and_finishes(terms, [("a", 0.0, 10, 2), ("a", 1.0, 12, 2)])
    assert times[1][0] == pytest.approx(1.0 + 0.1)  # the profile's 12-token prefill, no shape extra
    assert res.stats["runner_extra_s"] == pytest.approx(0.02)  # a's first prefill and its first decode
    measured = [{"model": "m", "cores": 1, "shapes": {"counts": [{"tokens": 8, "extra_ms": 1.0}], "pad_tokens": 16}}]
    assert RunnerTerms.from_measured(measured, "test").prefill_shape("m", 1, 5) == 16


def test_shape_terms_read_from_measurements_interpolate_between_token_counts():
    measured = [{"model": "m", "cores": 1, "shapes": {"counts": [
        {"tokens": 512, "extra_ms": 16.0}, {"tokens": 32, "extra_ms": 12.0}, {"tokens": 8, "extra_ms": -1.0}]}}]
    terms = RunnerTerms.from_measured(measured, "test")
    extra = lambda n: terms.first_step_extra("m", 1, after_other=False, idle_for=0.0, admitting=False,  # noqa: E731
                                             new_shape=n)
    assert extra(0) == 0.0  # a count the engine ran before
    assert extra(8) == 0.0  # measured below zero: noise, charged as none
    assert extra(20) == pytest.approx(0.006)
    assert extra(272) == pytest.approx(0.014)
    assert extra(4096) == pytest.approx(0.016)  # beyond the measured counts: the nearest one


def test_a_job_starting_while_an_engine_works_on_other_cores_runs_at_the_beside_factor():
    """`beside` (hwloop.terms beside) at a flat 2×: a and b (cores 0 and 1) start together, so each
    runs beside the other: prefill 0.2, decode 0.02. a's second request, with b idle, runs alone."""
    terms = RunnerTerms(beside={("llama-7b", 1): ((1, 2.0), (100, 2.0))}, label="test")
    times, res = first_tokens_and_finishes(terms, [("a", 0.0, 10, 2), ("b", 0.0, 10, 2), ("a", 1.0, 10, 2)])
    assert times == [pytest.approx([0.2, 0.22]), pytest.approx([0.2, 0.22]), pytest.approx([1.1, 1.11])]
    assert res.stats["beside_starts"] == 4


def test_beside_factors_read_from_measurements_interpolate_and_never_speed_up():
    measured = [{"model": "m", "cores": 1, "beside": {"sizes": [
        {"kind": "prefill", "tokens": 256, "factor": 1.2}, {"kind": "decode", "tokens": 1, "factor": 0.97},
        {"kind": "decode", "tokens": 32, "factor": 1.6}]}}]
    terms = RunnerTerms.from_measured(measured, "test")
    assert terms.beside_factor("m", 1, 1) == 1.0  # measured below 1: noise, charged as none
    assert terms.beside_factor("m", 1, 32) == pytest.approx(1.6)
    assert terms.beside_factor("m", 1, 144) == pytest.approx(1.4)
    assert terms.beside_factor("m", 1, 4096) == pytest.approx(1.2)
    assert terms.beside_factor("m", 2, 32) == 1.0  # not measured


def test_a_running_job_is_rescaled_when_an_engine_starts_or_stops_beside_it():
    """Flat 2× beside. a prefills alone from 0 (0.1 s of work); b starts on the other core at 0.05, so
    a's second half takes 0.1: first token 0.15, then its decode beside b, 0.02: done at 0.17. b did
    0.06 of its 0.1 by then and finishes the rest alone: 0.21, then decodes alone: 0.22."""
    terms = RunnerTerms(beside={("llama-7b", 1): ((1, 2.0), (100, 2.0))}, label="test")
    times, res = first_tokens_and_finishes(terms, [("a", 0.0, 10, 2), ("b", 0.05, 10, 2)])
    assert times == [pytest.approx([0.15, 0.17]), pytest.approx([0.21, 0.22])]
    assert res.stats["beside_rescales"] >= 2  # a when b started, b when a stopped
