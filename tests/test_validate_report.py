"""The validation report's pure parts: profile drift, rankings, the README block (no engines)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from experiments.config import ConfigError
from experiments.validate import README_BEGIN, README_END, profile_drift, rankings, update_readme

CELL = {"model": "m", "sm_pct": 100, "phase": "decode", "batch": 1, "seq_len": 64}


def test_profile_drift_is_flagged_when_a_cell_moves_more_than_the_limit():
    start = pd.DataFrame([{**CELL, "profile_ms": 10.0, "now_ms": 10.5}])
    steady = profile_drift(start, start.assign(now_ms=10.9), limit=0.10)
    assert not steady["flagged"] and steady["end_vs_start_max"] == pytest.approx(0.4 / 10.5)
    moved = profile_drift(start, start.assign(now_ms=12.0), limit=0.10)
    assert moved["flagged"] and moved["end_vs_start_median"] == pytest.approx(1.5 / 10.5)
    stale = profile_drift(start.assign(now_ms=8.0), start.assign(now_ms=8.0), limit=0.10)
    assert stale["flagged"] and stale["start_vs_profile_max"] == pytest.approx(0.2)  # the profile itself is off


def test_rankings_compare_the_order_of_systems_per_level():
    rows = pd.DataFrame([
        {"level": 0, "offered_rps": 1.0, "system": "a", "metric": "throughput_rps", "sim": 2.0, "hw": 2.2},
        {"level": 0, "offered_rps": 1.0, "system": "b", "metric": "throughput_rps", "sim": 1.0, "hw": 1.1},
        {"level": 1, "offered_rps": 2.0, "system": "a", "metric": "throughput_rps", "sim": 2.0, "hw": 1.0},
        {"level": 1, "offered_rps": 2.0, "system": "b", "metric": "throughput_rps", "sim": 1.0, "hw": 1.5}])
    r = rankings(rows)
    assert r["same"].tolist() == [True, False]
    assert r["hw"].tolist() == ["a > b", "b > a"]


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
