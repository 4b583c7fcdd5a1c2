"""Runs sized as MuxServe's benchmarks: requests per LLM from the placement's estimate, or a fixed
request set split by rate; beside the plain fixed-duration traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experiments.config import build_cluster, build_cost, build_workload
from experiments.sizing import BENCH_S, MARGIN, mean_lengths, paper_counts
from policies.cost import RooflineCostModel
from policies.placement_algos import demands_from_spec, make_placement
from policies.specs import GPU_PRESETS, ClusterSpec
from tests.test_experiments_config import TINY, composed
from traces import WorkloadError, generate, power_law_spec
from traces.lengths import MUXSERVE_LIMITS, SHAREGPT_FIT
from traces.loaders.muxserve_yaml import load_muxserve_yaml
from traces.synthetic import counts_by_rate

SPEC = power_law_spec(["llama-7b", "llama-7b", "llama-13b"], 0.9, top_rate=30.0)


def test_generate_with_counts_gives_exactly_those_requests_at_each_rate() -> None:
    counts = {"llm-0": 3000, "llm-1": 5, "llm-2": 0}
    df = generate(SPEC, 0.0, seed=3, counts=counts).df
    assert df.groupby("model").size().to_dict() == {"llm-0": 3000, "llm-1": 5}
    span = df[df["model"] == "llm-0"]["arrival_s"].max()
    assert 3000 / span == pytest.approx(30.0, rel=0.05)  # arrivals at the LLM's rate, from t = 0
    with pytest.raises(WorkloadError, match="'llm-1': request count must be an integer"):
        generate(SPEC, 0.0, counts={"llm-0": 1, "llm-1": -1, "llm-2": 0})


def test_counts_by_rate_split_a_fixed_total_exactly() -> None:
    counts = counts_by_rate(SPEC, 8091)
    assert sum(counts.values()) == 8091
    rates = SPEC.rates()
    for name, n in counts.items():
        assert abs(n - 8091 * rates[name] / sum(rates.values())) < 1


def test_paper_counts_follow_the_placement_estimate() -> None:
    cluster = ClusterSpec(1, 2, GPU_PRESETS["A100-80GB"])
    cost = RooflineCostModel(cluster.gpu)
    opts = {"batch_limit_per_gpu": 2}  # so that llm-0's 30 req/s is more than its placement serves
    counts = paper_counts(SPEC, cluster, cost, opts)
    est = make_placement("muxserve", demands_from_spec(SPEC, *mean_lengths(SHAREGPT_FIT, MUXSERVE_LIMITS)),
                         cluster, cost, **opts).meta["llms"]
    for m in SPEC.llms:
        assert counts[m.name] == int(min(est[m.name]["est_tpt"], m.rate) * BENCH_S * MARGIN)
    assert est["llm-0"]["est_tpt"] < 30.0 and counts["llm-0"] < 30.0 * BENCH_S  # a burst, not 240 s of overload


def test_workload_sizing_option() -> None:
    cfg = composed([*TINY, "workload.sizing=paper"])
    cluster = build_cluster(cfg)
    w = build_workload(cfg, cluster, build_cost(cfg, cluster))
    assert w.meta["duration_s"] is None and sum(w.meta["counts"].values()) == len(w.df)
    assert w.df["arrival_s"].max() > 200  # 264 s of arrivals for LLMs the placement serves in full
    plain = build_workload(composed(TINY))
    assert plain.meta["counts"] is None and plain.df["arrival_s"].max() < 3


def test_muxserve_yaml_total_requests(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("models:\n  - {name: a, model: /x/llama-7b, rate: 30}\n  - {name: b, model: /x/llama-13b, rate: 10}\n")
    df = load_muxserve_yaml(path, duration_s=1.0, total_requests=8091).df
    assert len(df) == 8091 and df.groupby("model").size().to_dict() == {"a": 6068, "b": 2023}
    assert np.isfinite(df["arrival_s"]).all()
