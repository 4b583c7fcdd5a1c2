"""Metrics on hand-made records: every figure checked against arithmetic done by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from policies.metrics import max_rate_within_slo, slo_attainment, standalone_latency, summarize
from policies.specs import MODEL_PRESETS
from tests.sim_helpers import table


def records(rows):
    cols = ["request_id", "model", "unit", "arrival_s", "first_token_s", "finish_s", "prompt_tokens",
            "output_tokens", "preemptions", "status", "reason"]
    return pd.DataFrame(rows, columns=cols)


RECS = records([
    (0, "a", 0, 0.0, 1.0, 3.0, 10, 4, 0, "finished", ""),
    (1, "a", 0, 1.0, 1.5, 2.5, 10, 2, 1, "finished", ""),
    (2, "b", 0, 2.0, 4.0, 6.0, 10, 8, 0, "finished", ""),
    (3, "b", 0, 3.0, math.nan, math.nan, 10, 8, 0, "failed", "horizon"),
])


def test_throughput_latency_and_tpot_by_hand():
    s = summarize(RECS, rates={"a": 3.0, "b": 1.0})
    o = s.overall
    assert o["makespan_s"] == 6.0 and o["finished"] == 3 and o["failed"] == 1
    assert o["throughput_rps"] == pytest.approx(3 / 6)
    assert o["tokens_per_s"] == pytest.approx(14 / 6)
    assert o["latency_mean_s"] == pytest.approx((3 + 1.5 + 4) / 3)
    assert o["ttft_p50_s"] == pytest.approx(1.0)
    assert o["tpot_mean_s"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    per = s.per_llm.set_index("model")
    assert per.loc["a", "throughput_rps"] == pytest.approx(2 / 6)
    # Rate-weighted: (3 × 2/6 + 1 × 1/6) / 4
    assert o["rate_weighted_throughput_rps"] == pytest.approx((3 * 2 / 6 + 1 / 6) / 4)
    assert o["preemptions"] == 1


def test_slo_attainment_counts_failed_requests_as_misses():
    baseline = np.array([1.0, 1.0, 1.0, 1.0])
    slo = slo_attainment(RECS, baseline, scales=(1, 2, 3, 4))
    # latencies 3, 1.5, 4 (+ one failed): within 1×: none... within 2×: 1.5; 3×: +3; 4×: +4
    assert slo.tolist() == [0.0, 0.25, 0.5, 0.75]


def test_standalone_latency_is_prefill_plus_decode_steps():
    cost = table(prefill_s=0.1, decode_s=0.01)
    lat = standalone_latency(RECS, {"a": MODEL_PRESETS["llama-7b"], "b": MODEL_PRESETS["llama-7b"]},
                             {"a": 1, "b": 1}, cost)
    assert lat == pytest.approx([0.1 + 3 * 0.01, 0.1 + 1 * 0.01, 0.1 + 7 * 0.01, 0.1 + 7 * 0.01])


def test_max_rate_within_slo_finds_the_knee():
    knee = 3.7
    found = max_rate_within_slo(lambda r: 1.0 if r <= knee else 0.5, lo=0.5, hi=8.0, tolerance=0.01)
    assert knee - 0.1 <= found <= knee
    assert max_rate_within_slo(lambda r: 0.0, lo=0.5, hi=8.0) == 0.0


def test_goodput_counts_requests_within_the_slo_over_the_makespan_and_the_steady_window():
    """a arrives at 0, 1 and 2 (its window; too short a run for a warm-up to be cut). Latencies 0.5,
    0.8 and 3 against standalone 0.5, 0.3 and 0.5: within 2× only the first. Over the makespan (5 s)
    goodput@2 is 1/5; over the window [0, 2], where two finish (0.5 and 1.8), steady throughput is
    2/2 and steady goodput 1/2."""
    recs = records([
        (0, "a", 0, 0.0, 0.2, 0.5, 10, 2, 0, "finished", ""),
        (1, "a", 0, 1.0, 1.2, 1.8, 10, 2, 0, "finished", ""),
        (2, "a", 0, 2.0, 4.0, 5.0, 10, 2, 0, "finished", ""),
    ])
    o = summarize(recs, baseline=np.array([0.5, 0.3, 0.5]), slo_scales=(2,), goodput_scale=2).overall
    assert o["steady_warmup_s"] == 0.0
    assert o["goodput_rps@2"] == pytest.approx(1 / 5)
    assert o["steady_throughput_rps"] == pytest.approx(1.0)
    assert o["steady_goodput_rps@2"] == pytest.approx(0.5)
