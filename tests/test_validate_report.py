"""The validation report's pure parts: profile drift, rankings, the README block (no engines)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from experiments.config import ConfigError
from experiments.validate import (
    README_BEGIN,
    README_END,
    profile_drift,
    profile_frame,
    rankings,
    scaled_cost,
    speed_factors,
    update_readme,
)
from hwloop.profiler import ProfileResult, write_profile
from policies.cost import TableCostModel
from policies.specs import ModelSpec

CELL = {"model": "m", "sm_pct": 100, "phase": "decode", "batch": 1, "seq_len": 64}


def test_profile_drift_is_flagged_when_a_cell_moves_more_than_the_limit():
    start = pd.DataFrame([{**CELL, "profile_ms": 10.0, "now_ms": 10.5}])
    steady = profile_drift(start, start.assign(now_ms=10.9), limit=0.10)
    assert not steady["flagged"] and steady["end_vs_start_max"] == pytest.approx(0.4 / 10.5)
    moved = profile_drift(start, start.assign(now_ms=12.0), limit=0.10)
    assert moved["flagged"] and moved["end_vs_start_median"] == pytest.approx(1.5 / 10.5)
    stale = profile_drift(start.assign(now_ms=8.0), start.assign(now_ms=8.0), limit=0.10)
    assert stale["flagged"] and stale["start_vs_profile_max"] == pytest.approx(0.2)  # the profile itself is off


def test_speed_factors_are_per_phase_medians_of_both_checks_and_scale_only_their_cells(tmp_path: Path):
    """A slow period slows small decode steps more than prefills: the profile is scaled per model,
    share and phase by the median of now / profile over the cells timed before and after a repeat."""
    decode, prefill = CELL, {**CELL, "phase": "prefill"}
    before = pd.DataFrame([{**decode, "profile_ms": 10.0, "now_ms": 12.0}, {**decode, "batch": 8, "profile_ms": 20.0,
                                                                         "now_ms": 30.0},
                           {**prefill, "profile_ms": 40.0, "now_ms": 44.0}])
    after = before.assign(now_ms=[13.0, 26.0, 40.0])
    factors = speed_factors(before, after).set_index("phase")["factor"]
    assert factors["decode"] == pytest.approx((1.3 + 1.3) / 2)  # median of 1.2, 1.5, 1.3, 1.3
    assert factors["prefill"] == pytest.approx(1.05)
    spec = ModelSpec(name="m", num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=2, intermediate_size=128,
                     vocab_size=100, max_context=256)
    rows = [{"model": "m", "tp": 1, "sm_pct": pct, "phase": phase, "batch": b, "seq_len": n,
             "latency_ms": 10.0 * b + n / 10, "std_ms": 0.0}
            for pct in (50, 100) for phase in ("prefill", "decode") for b in (1, 8) for n in (16, 64)]
    path = write_profile(ProfileResult(pd.DataFrame(rows)), tmp_path / "m.parquet")
    scaled = scaled_cost(profile_frame([path]), speed_factors(before, after))
    plain = TableCostModel.from_frame(pd.DataFrame(rows), label="p")
    assert scaled.decode_time(spec, 1, 100, 4, 40) == pytest.approx(1.3 * plain.decode_time(spec, 1, 100, 4, 40))
    assert scaled.prefill_time(spec, 1, 100, 2, 32) == pytest.approx(1.05 * plain.prefill_time(spec, 1, 100, 2, 32))
    assert scaled.decode_time(spec, 1, 50, 4, 40) == pytest.approx(plain.decode_time(spec, 1, 50, 4, 40))  # not rechecked


def test_rankings_compare_the_order_of_systems_per_level():
    rows = pd.DataFrame([
        {"level": 0, "offered_rps": 1.0, "system": "a", "metric": "throughput_rps", "sim": 2.0, "hw": 2.2},
        {"level": 0, "offered_rps": 1.0, "system": "b", "metric": "throughput_rps", "sim": 1.0, "hw": 1.1},
        {"level": 1, "offered_rps": 2.0, "system": "a", "metric": "throughput_rps", "sim": 2.0, "hw": 1.0},
        {"level": 1, "offered_rps": 2.0, "system": "b", "metric": "throughput_rps", "sim": 1.0, "hw": 1.5}])
    r = rankings(rows, tie=0.05)
    assert r["same"].tolist() == [True, False] and r["strict"].tolist() == [True, False]
    assert r["hw"].tolist() == ["a > b", "b > a"]


def test_systems_closer_than_the_throughput_target_are_a_tie_in_the_ranking():
    def level(sim: dict[str, float], hw: dict[str, float]) -> pd.Series:
        rows = pd.DataFrame([{"level": 0, "system": x, "metric": "throughput_rps", "sim": sim[x], "hw": hw[x]}
                             for x in sim])
        return rankings(rows, tie=0.05).iloc[0]

    # muxserve and spatial with the same placement: 0.1% apart in the simulator, 0.3% the other way on hardware.
    r = level({"spatial": 20.67, "muxserve": 20.66, "temporal": 15.0}, {"spatial": 20.77, "muxserve": 20.83, "temporal": 14.0})
    assert r["same"] and not r["strict"]
    # the hardware puts muxserve 6% ahead where the simulator has spatial ahead (by any margin): a clash.
    assert not level({"spatial": 20.67, "muxserve": 20.66}, {"spatial": 20.0, "muxserve": 21.2})["same"]
    # the simulator puts spatial 6% ahead and the hardware has them level: a clash too.
    assert not level({"spatial": 21.9, "muxserve": 20.66}, {"spatial": 20.0, "muxserve": 20.0})["same"]
    # within 5% in both executors, in opposite orders: a tie.
    assert level({"spatial": 20.9, "muxserve": 20.0}, {"spatial": 20.0, "muxserve": 20.9})["same"]


def test_readme_block_is_replaced_and_a_readme_without_markers_refused(tmp_path: Path):
    readme, fig = tmp_path / "README.md", tmp_path / "validate_load.png"
    fig.write_bytes(b"png")
    readme.write_text(f"# t\nbefore\n{README_BEGIN}\nold\n{README_END}\nafter\n")
    update_readme(readme, "new table\n", fig, tmp_path / "docs" / "img")
    assert readme.read_text() == f"# t\nbefore\n{README_BEGIN}\nnew table\n{README_END}\nafter\n"
    assert (tmp_path / "docs" / "img" / "validate_load.png").read_bytes() == b"png"
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="validate:begin"):
        update_readme(readme, "x\n", fig, tmp_path / "docs" / "img")


def test_a_cached_profile_older_than_max_age_is_measured_again(tmp_path: Path):
    """This machine's speed drifts between hours and days: an old profile or terms file is not reused."""
    from hydra import compose, initialize_config_dir

    from experiments.validate import CONF_DIR, build_setup, config_error, reusable

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="validate", overrides=[f"profile.dir={tmp_path}", "profile.max_age_h=0.5"])
    s = build_setup(cfg)
    path = tmp_path / "m.parquet"
    assert not reusable(path, s)  # missing
    path.write_bytes(b"x")
    assert reusable(path, s)
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    assert not reusable(path, s)
    assert reusable(path, replace(s, max_age_s=math.inf))
    assert not reusable(tmp_path / "m.parquet", replace(s, reuse=False, max_age_s=math.inf))
    assert config_error(["profile.max_age_h=0"]) == "ConfigError: profile.max_age_h must be a number of hours > 0 or null (got 0)"


def test_job_report_refuses_a_folder_that_is_no_finished_run(tmp_path: Path):
    import subprocess
    import sys

    from experiments.job_report import job_ratios

    with pytest.raises(ConfigError, match=r"no summary\.json"):
        job_ratios(tmp_path)
    done = subprocess.run([sys.executable, "-m", "experiments.job_report", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "no summary.json" in done.stderr


def test_a_noisy_profile_cell_keeps_the_quieter_of_its_two_timings():
    from hwloop.profiler import NOISY_SPREAD, quieter, spread

    disturbed = (0.230, 0.120, 0.310, 0.231, 0.160)  # a preempted cell: ~0.2 s where the step takes 7 ms
    settled = (0.0071, 0.0070, 0.0072, 0.0069, 0.0071)
    assert spread(disturbed) > NOISY_SPREAD > spread(settled)
    assert quieter(disturbed, settled) == settled
    assert quieter(settled, disturbed) == settled  # a retake disturbed in turn does not replace a quiet first one
    assert spread((0.005,)) == 0.0


def test_the_profile_bar_counts_cells_timed_again_past_its_total(capsys: pytest.CaptureFixture[str]):
    """The profiler reports a noisy cell's second timing too: the bar must grow, not crash (tqdm
    cannot draw a count past its total: a run died on it at the profile's last cell)."""
    from experiments.validate import _bar, _count

    with _bar("profile m", 2, "cell", enabled=True) as bar:
        tick = _count(bar)
        for message in ("decode b=1", "decode b=2", "decode b=2 again"):
            tick(message)
        assert (bar.n, bar.total) == (3, 3)
    assert "3/3 cell" in capsys.readouterr().err


def test_a_run_folder_from_before_the_shapes_rename_still_reads(tmp_path: Path):
    """`experiments.validate` called its model list `models` until 61fb27b; the job tools read such
    folders' config with the list under its new name, and refuse a GPU run job_replay cannot replay."""
    import json

    from hydra import compose, initialize_config_dir

    from experiments.job_replay import logged_run
    from experiments.job_report import run_config
    from experiments.validate import CONF_DIR, build_setup

    shape = {"name": "tiny", "num_layers": 2, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 4,
             "intermediate_size": 344, "vocab_size": 512, "max_context": 512}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = OmegaConf.to_container(compose(config_name="validate", overrides=["mode=split"]), resolve=True)
    config.pop("shapes")
    config["models"] = [shape]
    (tmp_path / "summary.json").write_text(json.dumps({"config": config}))
    assert [s.name for s in build_setup(run_config(tmp_path)).specs.values()] == ["tiny"]
    config["device"] = "cuda"
    (tmp_path / "summary.json").write_text(json.dumps({"config": config}))
    with pytest.raises(ConfigError, match="a device=cuda run; job_replay replays on this machine's CPU cores"):
        logged_run(tmp_path, level=0, repeat=0)
