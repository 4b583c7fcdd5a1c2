"""The simulator's model of the CPU runner's core slices: launches on busy cores take turns."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.batching import make_batching
from policies.placement import blocks_for_tokens, blocks_per_chunk
from sim import Simulator
from tests.sim_helpers import SPECS, one_unit, table, workload
from tests.test_sim import PROPERTY, Checked, requests

# a and c pinned to the same core, b to its own: a and c take turns, b runs beside either.
SLICES = {"a": (0,), "b": (1,), "c": (0,)}


def simulate(wl, slices=SLICES, skip=True, policy="adbs", kv_blocks=10**6, cost=None):
    placement = one_unit(["a", "b", "c"], kv_blocks=kv_blocks, max_batch=8, rates=[3.0, 2.0, 1.0])
    sim = Checked(wl, placement, make_batching(policy), cost or table(), SPECS, mode="mixed", skip_steps=skip,
                  core_slices=slices)
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


@PROPERTY
@given(rows=requests, policy=st.sampled_from(["adbs", "fcfs"]), tight=st.booleans())
def test_turn_taking_skips_decode_steps_exactly_and_reports_every_request(rows, policy, tight):
    kv = blocks_for_tokens(2048, blocks_per_chunk(SPECS["llama-7b"])) * (3 if tight else 300)
    wl = workload(rows)
    fast, _ = simulate(wl, skip=True, policy=policy, kv_blocks=kv, cost=table(per_token=1e-4))
    slow, _ = simulate(wl, skip=False, policy=policy, kv_blocks=kv, cost=table(per_token=1e-4))
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
