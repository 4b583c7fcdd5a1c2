"""A small multirun through the joblib launcher, then collect and plot, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.collect import collect
from experiments.plot import main as plot_main
from tests.test_experiments_config import TINY


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    p = subprocess.run(
        [sys.executable, "-m", "experiments.run", "-m", *TINY, "workload.alpha=0.7,2.1",
         "systems=[muxserve,spatial]", f"hydra.sweep.dir={out}"],
        capture_output=True, text=True, timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_each_job_writes_its_results(sweep: Path) -> None:
    for job in ("0", "1"):
        folder = sweep / job
        for name in ("summary.csv", "summary.json", "per_llm.csv", "records_muxserve.parquet",
                     "records_spatial.parquet", "placement_muxserve.json", "slo_attainment.png"):
            assert (folder / name).exists(), folder / name
        records = pd.read_parquet(folder / "records_muxserve.parquet")
        assert len(records) > 0 and set(records["status"]) <= {"finished", "failed"}


def test_the_sweep_callback_collects_and_plots(sweep: Path) -> None:
    table = pd.read_parquet(sweep / "collected.parquet")
    assert len(table) == 4  # 2 jobs × 2 systems
    assert sorted(table["workload.alpha"].unique()) == [0.7, 2.1]
    assert set(table["system"]) == {"muxserve", "spatial"}
    assert (table["throughput_rps"] > 0).all()
    for name in ("throughput_vs_alpha.png", "slo_attainment.png", "per_llm_throughput.png"):
        assert (sweep / "figures" / name).stat().st_size > 10_000


def test_collect_and_plot_from_the_command_line(sweep: Path, tmp_path: Path) -> None:
    c = collect(sweep)
    columns = list(c.summary.columns)
    assert columns[0] == "job" and not c.missing
    assert columns.index("workload.alpha") < columns.index("system") < columns.index("throughput_rps")
    assert set(c.per_llm["model"]) == {"llm-0", "llm-1", "llm-2"}
    p = subprocess.run([sys.executable, "-m", "experiments.collect", str(sweep)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "4 rows" in p.stdout
    plot_main([str(sweep / "collected.csv"), "--out", str(tmp_path), "--job", "1"])
    assert {f.name for f in tmp_path.iterdir()} >= {"throughput_vs_alpha.png", "per_llm_throughput.png",
                                                    "slo_attainment.png"}


def test_plot_reports_a_missing_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        plot_main([str(tmp_path / "nothing")])
    assert e.value.code == 2
