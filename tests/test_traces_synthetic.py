"""Synthetic workloads: popularity, arrival processes, lengths, determinism and speed."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from traces import (
    MUXSERVE_LIMITS,
    SHAREGPT_FIT,
    Cluster,
    EmpiricalLengths,
    LengthLimits,
    LognormalLengths,
    ServedLLM,
    Workload,
    WorkloadError,
    WorkloadSpec,
    arrivals_count,
    arrivals_until,
    generate,
    muxserve_synthetic,
    power_law_rates,
    power_law_spec,
    setup,
)


def one_llm(rate: float) -> WorkloadSpec:
    return WorkloadSpec((ServedLLM("llm-0", "llama-7b", rate),))


def test_power_law_rates_scale_by_top_or_total() -> None:
    top = power_law_rates(4, 1.0, top_rate=12.0)
    np.testing.assert_allclose(top, [12.0, 6.0, 4.0, 3.0])
    total = power_law_rates(4, 1.0, total_rate=50.0)
    np.testing.assert_allclose(total, [24.0, 12.0, 8.0, 6.0])
    np.testing.assert_allclose(power_law_rates(3, 0.0, total_rate=3.0), [1.0, 1.0, 1.0])
    with pytest.raises(WorkloadError, match="exactly one"):
        power_law_rates(4, 1.0)
    with pytest.raises(WorkloadError, match="exactly one"):
        power_law_rates(4, 1.0, top_rate=1.0, total_rate=1.0)


def test_muxserve_synthetic_matches_the_paper_setup() -> None:
    spec = muxserve_synthetic(alpha=1.3, scale=0.5)
    assert [m.name for m in spec.llms] == [f"llm-{i}" for i in range(19)]
    types = [m.model_type for m in spec.llms]
    assert types == ["llama-7b"] * 12 + ["llama-13b"] * 4 + ["llama-30b"] * 2 + ["llama-65b"]
    assert spec.llms[0].rate == pytest.approx(20.0)
    for i, m in enumerate(spec.llms):
        assert m.rate == pytest.approx(20.0 * (i + 1) ** -1.3)
    assert spec.cluster == Cluster(nnodes=4, ngpus_per_node=8)
    assert spec.cluster.ngpus == 32
    assert setup("muxserve-synthetic", 1.3, 0.5) == spec
    with pytest.raises(WorkloadError, match="unknown set-up 'nope'"):
        setup("nope")


def test_spec_rejects_duplicate_names_and_bad_rates() -> None:
    with pytest.raises(WorkloadError, match="duplicate LLM name 'a'"):
        WorkloadSpec((ServedLLM("a", "t", 1.0), ServedLLM("a", "t", 2.0)))
    with pytest.raises(WorkloadError, match="LLM 'a': rate"):
        WorkloadSpec((ServedLLM("a", "t", -1.0),))


@settings(max_examples=12, deadline=None)
@given(
    alpha=st.floats(0.5, 2.5),
    scale=st.floats(0.25, 1.25),
    cv=st.sampled_from([0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_realised_rates_are_within_five_sigma_of_target(
    alpha: float, scale: float, cv: float, seed: int
) -> None:
    duration = 60.0
    spec = muxserve_synthetic(alpha, scale)
    counts = generate(spec, duration, seed, cv=cv).df["model"].value_counts()
    for llm in spec.llms:
        expected = llm.rate * duration
        # A renewal count's variance is ≈ cv²·λT; the constant covers the start-up boundary.
        tolerance = 5 * cv * math.sqrt(expected) + 5
        assert abs(counts.get(llm.name, 0) - expected) <= tolerance, llm


def test_same_seed_same_table_other_seed_other_table() -> None:
    spec = muxserve_synthetic(0.9, 0.5)
    a = generate(spec, 30.0, seed=7)
    b = generate(spec, 30.0, seed=7)
    pd.testing.assert_frame_equal(a.df, b.df)
    assert a.meta == b.meta
    c = generate(spec, 30.0, seed=8)
    assert not a.df["arrival_s"].equals(c.df["arrival_s"])


def test_changing_one_llm_leaves_the_others_unchanged() -> None:
    spec = muxserve_synthetic(0.9, 0.5)
    changed = replace(spec, llms=(*spec.llms[:-1], replace(spec.llms[-1], rate=5.0)))
    a, b = generate(spec, 30.0, seed=3).df, generate(changed, 30.0, seed=3).df
    keep = ["model", "arrival_s", "prompt_tokens", "output_tokens"]
    others_a = a[a["model"] != "llm-18"][keep].reset_index(drop=True)
    others_b = b[b["model"] != "llm-18"][keep].reset_index(drop=True)
    pd.testing.assert_frame_equal(others_a, others_b)


def test_workload_columns_ids_and_metadata() -> None:
    spec = muxserve_synthetic(2.1, 1.0)
    w = generate(spec, 20.0, seed=0)
    assert list(w.df.columns) == [
        "request_id",
        "model",
        "arrival_s",
        "prompt_tokens",
        "output_tokens",
        "model_type",
    ]
    assert (w.df["request_id"].to_numpy() == np.arange(len(w))).all()
    assert w.df["arrival_s"].is_monotonic_increasing
    assert w.df["arrival_s"].between(0, 20.0, inclusive="left").all()
    types = spec.model_types()
    assert (w.df["model_type"] == w.df["model"].map(types)).all()
    assert w.meta["seed"] == 0 and w.meta["spec"]["cluster"] == {"nnodes": 4, "ngpus_per_node": 8}
    assert set(w.meta["clipped"]) == {"prompt", "output"}


def test_cv_one_is_a_poisson_process() -> None:
    gaps = np.diff(arrivals_until(np.random.default_rng(0), 50.0, 200.0, cv=1.0), prepend=0.0)
    assert sps.kstest(gaps, "expon", args=(0, 1 / 50.0)).pvalue > 0.01


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_arrivals_have_the_requested_cv(cv: float) -> None:
    gaps = np.diff(arrivals_count(np.random.default_rng(1), 10.0, 40_000, cv=cv), prepend=0.0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_arrivals_reject_bad_parameters() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(WorkloadError, match="cv must be"):
        arrivals_until(rng, 1.0, 10.0, cv=0.0)
    with pytest.raises(WorkloadError, match="rate must be"):
        arrivals_until(rng, -1.0, 10.0)
    with pytest.raises(WorkloadError, match="rate must be > 0"):
        arrivals_count(rng, 0.0, 10)
    assert arrivals_until(rng, 0.0, 10.0).size == 0
    with pytest.raises(WorkloadError, match="produced no requests"):
        generate(one_llm(0.0), 10.0)
    with pytest.raises(WorkloadError, match="duration_s"):
        generate(one_llm(1.0), 0.0)


def test_lengths_respect_muxserve_limits() -> None:
    df = generate(one_llm(500.0), 100.0, seed=2).df
    assert df["prompt_tokens"].between(4, 1024).all()
    assert (df["output_tokens"] >= 4).all()
    assert (df["prompt_tokens"] + df["output_tokens"] <= 2048).all()


def test_length_limits_clip_and_count() -> None:
    limits = LengthLimits(prompt_min=4, prompt_max=10, output_min=2, max_total=15)
    p, o, changed = limits.clip(np.array([1, 5, 50]), np.array([1, 20, 3]))
    assert p.tolist() == [4, 5, 10] and o.tolist() == [2, 10, 3]
    assert changed == {"prompt": 2, "output": 2}
    with pytest.raises(WorkloadError, match="contradictory"):
        LengthLimits(prompt_min=10, prompt_max=5)
    with pytest.raises(WorkloadError, match="contradictory"):
        LengthLimits(prompt_min=10, output_min=10, max_total=15)


def test_sharegpt_fit_has_the_published_means_after_clipping() -> None:
    rng = np.random.default_rng(0)
    p, o, _ = MUXSERVE_LIMITS.clip(*SHAREGPT_FIT.sample(rng, 400_000))
    assert p.mean() == pytest.approx(161, rel=0.02)
    assert o.mean() == pytest.approx(338, rel=0.02)


def test_lognormal_from_means() -> None:
    lengths = LognormalLengths.from_means(100.0, 200.0, sigma=0.5)
    p, o = lengths.sample(np.random.default_rng(0), 200_000)
    assert p.mean() == pytest.approx(100, rel=0.01)
    assert o.mean() == pytest.approx(200, rel=0.01)
    with pytest.raises(WorkloadError):
        LognormalLengths.from_means(0.0, 1.0)


def test_empirical_lengths_resample_whole_pairs() -> None:
    source = Workload(
        pd.DataFrame(
            {
                "request_id": [0, 1, 2],
                "model": "m",
                "arrival_s": [0.0, 1.0, 2.0],
                "prompt_tokens": [10, 2000, 30],
                "output_tokens": [1, 5, 3000],
            }
        ),
        {"source": "tiny"},
    )
    lengths = EmpiricalLengths.from_workload(source)
    w = generate(one_llm(100.0), 10.0, seed=0, lengths=lengths, limits=LengthLimits())
    pairs = set(zip(w.df["prompt_tokens"], w.df["output_tokens"], strict=True))
    assert pairs <= {(10, 1), (2000, 5), (30, 3000)} and len(pairs) == 3
    assert "tiny" in w.meta["lengths"] and w.meta["clipped"] == {"prompt": 0, "output": 0}


def test_power_law_spec_with_total_rate() -> None:
    spec = power_law_spec(["llama-7b", "llama-13b", "llama-30b"], 1.0, total_rate=11.0)
    assert spec.total_rate == pytest.approx(11.0)
    assert [m.name for m in spec.llms] == ["llm-0", "llm-1", "llm-2"]


def test_128k_requests_in_well_under_a_second() -> None:
    spec = muxserve_synthetic(0.9, 1.0)
    duration = 128_000 / spec.total_rate
    generate(spec, 1.0, seed=0)  # warm-up: first calls pay for imports and allocations
    start = time.perf_counter()
    w = generate(spec, duration, seed=0)
    elapsed = time.perf_counter() - start
    assert len(w) == pytest.approx(128_000, rel=0.02)
    assert elapsed < 0.5, f"{elapsed:.3f} s"
