"""Operations on Workloads: rescaling, windows, sampling, statistics and the popularity fit."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces import (
    Workload,
    WorkloadError,
    fit_alpha,
    generate,
    muxserve_synthetic,
    rescale_rate,
    rescale_time,
    sample,
    stats,
    window,
)


def small() -> Workload:
    return Workload(
        pd.DataFrame(
            {
                "request_id": range(6),
                "model": ["a", "b", "a", "a", "b", "a"],
                "arrival_s": [0.0, 1.0, 2.0, 4.0, 6.0, 10.0],
                "prompt_tokens": [10, 20, 30, 40, 50, 60],
                "output_tokens": [1, 2, 3, 4, 5, 6],
            }
        ),
        {"source": "small"},
    )


def test_rescale_time_and_rate() -> None:
    w = small()
    assert rescale_time(w, 2.0).df["arrival_s"].tolist() == [0.0, 2.0, 4.0, 8.0, 12.0, 20.0]
    faster = rescale_rate(w, 4.0)
    assert faster.df["arrival_s"].tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0, 1.5, 2.5])
    assert faster.meta["time_scale"] == pytest.approx(0.25)
    assert len(w) / w.duration_s == pytest.approx(0.6)
    at_3 = rescale_rate(w, total_rate=3.0)
    assert len(at_3) / at_3.duration_s == pytest.approx(3.0)
    assert w.df["arrival_s"].iloc[-1] == 10.0  # the input is not modified
    with pytest.raises(WorkloadError, match="small: time factor must be"):
        rescale_time(w, 0.0)
    with pytest.raises(WorkloadError, match="exactly one"):
        rescale_rate(w)


def test_window_drops_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="traces"):
        w = window(small(), 1.0, 6.0)
    assert w.df["arrival_s"].tolist() == [0.0, 1.0, 3.0]
    assert w.df["request_id"].tolist() == [1, 2, 3]
    assert w.meta["dropped"] == {"outside the window [1.0, 6.0) s": 3}
    assert "small: dropped 3 of 6 requests: outside the window" in caplog.text
    assert window(small(), 1.0, 6.0, rebase=False).df["arrival_s"].tolist() == [1.0, 2.0, 4.0]
    assert len(window(small(), end_s=3.0)) == 3
    with pytest.raises(WorkloadError, match=r"small: window \[20.0, 30.0\) s holds no requests"):
        window(small(), 20.0, 30.0)
    with pytest.raises(WorkloadError, match="start must be < end"):
        window(small(), 5.0, 5.0)


def test_sample_is_seeded_and_keeps_arrival_order() -> None:
    w = generate(muxserve_synthetic(0.9, 0.25), 30.0, seed=0)
    a, b = sample(w, 100, seed=5), sample(w, 100, seed=5)
    pd.testing.assert_frame_equal(a.df, b.df)
    assert len(a) == 100 and a.df["arrival_s"].is_monotonic_increasing
    assert a.meta["dropped"] == {"not in a random sample of 100 (seed 5)": len(w) - 100}
    assert not a.df.equals(sample(w, 100, seed=6).df)
    with pytest.raises(WorkloadError, match="cannot sample"):
        sample(w, len(w) + 1)


def test_drops_accumulate_across_steps() -> None:
    w = sample(window(small(), 0.0, 7.0), 3, seed=0)
    assert w.meta["dropped"] == {
        "outside the window [0.0, 7.0) s": 1,
        "not in a random sample of 3 (seed 0)": 2,
    }


def test_stats_table() -> None:
    table = stats(small())
    assert table["model"].tolist() == ["a", "b", "(all)"]
    a = table.iloc[0]
    assert a["requests"] == 4
    assert a["rate_rps"] == pytest.approx(0.4)
    gaps = np.diff([0.0, 2.0, 4.0, 10.0])
    assert a["iat_cv"] == pytest.approx(gaps.std() / gaps.mean())
    assert a["prompt_mean"] == pytest.approx(35.0)
    assert a["prompt_p50"] == pytest.approx(35.0)
    assert a["output_p99"] == pytest.approx(np.percentile([1, 3, 4, 6], 99))
    assert np.isnan(table.iloc[1]["iat_cv"])  # 2 requests: one gap, no spread
    assert table.iloc[2]["requests"] == 6


def test_stats_cv_of_generated_poisson_and_bursty_traffic() -> None:
    spec = muxserve_synthetic(0.9, 1.0)
    for cv in (1.0, 3.0):
        top = stats(generate(spec, 120.0, seed=1, cv=cv)).iloc[0]
        assert top["model"] == "llm-0"
        assert top["iat_cv"] == pytest.approx(cv, rel=0.1)


@settings(max_examples=10, deadline=None)
@given(alpha=st.floats(0.5, 2.1), seed=st.integers(0, 2**32 - 1))
def test_fit_alpha_recovers_the_generating_exponent(alpha: float, seed: int) -> None:
    spec = muxserve_synthetic(alpha, 1.0)
    w = generate(spec, 300.0, seed)
    assert fit_alpha(w) == pytest.approx(alpha, abs=0.05)
    assert fit_alpha(w, order=[m.name for m in spec.llms]) == pytest.approx(alpha, abs=0.05)


def test_fit_alpha_needs_two_models() -> None:
    one = small().df.assign(model="a")
    with pytest.raises(WorkloadError, match="at least 2 models"):
        fit_alpha(Workload(one, {"source": "one"}))
