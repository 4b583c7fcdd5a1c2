"""experiments.calibration: a measured table against the roofline and against another table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.calibration import report
from policies.cost import RooflineCostModel, TableCostModel, roofline_gap, table_ratio
from policies.specs import GPU_PRESETS, MODEL_PRESETS

A100 = RooflineCostModel(GPU_PRESETS["A100-80GB"])


def roofline_table(scale: float = 1.0, batches: tuple[int, ...] = (1, 64)) -> pd.DataFrame:
    """A profile-format table whose latencies are `scale` × the A100 roofline's."""
    spec = MODEL_PRESETS["llama-7b"]
    rows = []
    for sm in (50, 100):
        for batch in batches:
            for seq in (128, 1024):
                rows.append(("llama-7b", 1, sm, batch, seq, "prefill", 1e3 * scale * A100.prefill_time(spec, 1, sm, batch, seq)))
                rows.append(("llama-7b", 1, sm, batch, seq, "decode", 1e3 * scale * A100.decode_time(spec, 1, sm, batch, seq)))
    return pd.DataFrame(rows, columns=["model", "tp", "sm_pct", "batch", "seq_len", "phase", "latency_ms"])


def test_a_table_at_the_roofline_reaches_one_peak_on_every_full_gpu_cell() -> None:
    gap = roofline_gap(TableCostModel.from_frame(roofline_table(), "roofline"), A100, MODEL_PRESETS)
    assert len(gap) == 16 and gap["ratio"].to_numpy() == pytest.approx(1.0)
    full = gap[gap["sm_pct"] == 100]
    # The roofline's time is the larger of compute and traffic at full rates: one of them is 100%.
    assert full[["pct_peak_flops", "pct_peak_bandwidth"]].max(axis=1).to_numpy() == pytest.approx(100.0)
    assert (full[["pct_peak_flops", "pct_peak_bandwidth"]] <= 100 + 1e-9).all().all()
    # Decode at batch 1 is bound by memory; a long prefill by compute.
    one = full[(full["phase"] == "decode") & (full["batch"] == 1)]
    assert one["pct_peak_bandwidth"].to_numpy() == pytest.approx(100.0)
    long = full[(full["phase"] == "prefill") & (full["batch"] == 64)]
    assert long["pct_peak_flops"].to_numpy() == pytest.approx(100.0)


def test_tables_are_compared_only_where_both_measured() -> None:
    slow = TableCostModel.from_frame(roofline_table(2.0, batches=(1, 64, 128)), "slow")
    fast = TableCostModel.from_frame(roofline_table(), "fast")
    ratio = table_ratio(slow, fast)
    assert len(ratio) == 16 and ratio["ratio"].to_numpy() == pytest.approx(2.0)
    assert table_ratio(slow, TableCostModel.from_frame(roofline_table(batches=(32,)), "other")).empty


def test_the_command_prints_both_comparisons_and_writes_every_cell(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.parquet"
    roofline_table(3.0).to_csv(a, index=False)
    roofline_table().to_parquet(b)
    text = report(str(a), "A100-80GB", str(b), tmp_path / "out")
    assert "measured/roofline" in text and "3 [3–3]" in text
    assert len(pd.read_csv(tmp_path / "out" / "table_ratio.csv")) == 16
    assert len(pd.read_csv(tmp_path / "out" / "roofline_gap.csv")) == 16
    p = subprocess.run([sys.executable, "-m", "experiments.calibration", "--table", str(tmp_path / "none.csv")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "none.csv" in p.stderr
