"""experiment=max_rate: the highest rate within the SLO per system, in the summary and figure 4."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from experiments.config import build_cluster, build_cost, build_workload
from experiments.max_rate import at_scale, offered_rate
from experiments.plot import make_figures
from experiments.precheck import precheck
from experiments.run import CONF_DIR, run
from experiments.systems import run_system
from tests.test_experiments_config import TINY, composed

SEARCH = [*TINY, "experiment=max_rate", "max_rate.lo=1", "max_rate.hi=100",
          "max_rate.tolerance=0.2", "systems=[muxserve,spatial]", "report.progress=false",
          "report.records=false"]


@pytest.mark.parametrize(("override", "expected"), [
    ("max_rate.slo_scale=11", "ConfigError: max_rate.slo_scale must be one of 1, 1.5, 2, 3, 4, 5, 7.5, 8, 10,"),
    ("max_rate.target=1.5", "ConfigError: max_rate.target must be within (0, 1] (got 1.5)"),
    ("max_rate.hi=0.01", "ConfigError: max_rate.hi must be > max_rate.lo (0.05) (got 0.01)"),
    ("workload=azure", "ConfigError: max_rate: the search varies workload.scale, so it needs workload=synthetic"),
])
def test_bad_search_settings_name_the_key(override: str, expected: str) -> None:
    message = precheck(["experiment=max_rate", override], CONF_DIR)
    assert message is not None and message.startswith(expected) and "\n" not in message


def test_the_search_writes_the_highest_rate_that_meets_the_slo(tmp_path: Path) -> None:
    cfg = composed(SEARCH)
    res = run(cfg, tmp_path)
    s = res.summary.set_index("system")
    assert {"max_rate_scale", "max_rate_within_slo_rps", "max_rate_slo_scale", "max_rate_probes"} <= set(s.columns)
    for system, row in s.iterrows():
        scale = row["max_rate_scale"]
        assert scale == 0 or cfg.max_rate.lo <= scale <= cfg.max_rate.hi
        assert row["max_rate_within_slo_rps"] == pytest.approx(offered_rate(cfg, scale) if scale else 0.0)
        if scale:  # the answer is a load the system was seen to serve within the SLO
            at = at_scale(cfg, scale)
            cluster = build_cluster(at)
            again = run_system(str(system), build_workload(at), cluster, build_cost(at, cluster))
            assert again.summary.overall["slo_attainment@10"] >= 0.99
    assert 0 < s.loc["muxserve", "max_rate_scale"] < 100 and s.loc["muxserve", "max_rate_probes"] > 2
    assert tmp_path / "max_rate_within_slo.png" in res.plots
    two_alphas = pd.concat([res.summary.assign(alpha=a) for a in (0.9, 2.1)], ignore_index=True)
    assert tmp_path / "f" / "max_rate_within_slo.png" in make_figures(two_alphas, res.per_llm, tmp_path / "f")


def test_offered_rate_follows_the_power_law() -> None:
    cfg = composed(["workload.alpha=1.0"])
    assert offered_rate(cfg, 0.5) == pytest.approx(20 * sum(1 / (i + 1) for i in range(19)))
