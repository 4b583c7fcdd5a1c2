"""How far a measured latency table is from the roofline estimate, and from another table.

    python -m experiments.calibration --table PATH [--gpu NAME] [--against PATH] [--out DIR]

A table is MuxServe's latency JSON (`.json`) or a profile written by `experiments.profile` /
`experiments.gpu_calibrate` (`.csv`, `.parquet`). For each model and phase it prints, over the
cells measured at 100% SM:
- measured ÷ roofline latency (the roofline of `--gpu`, datasheet peaks, efficiencies 1);
- the share of peak FLOP/s a prefill reaches and the share of peak HBM bandwidth a decode step
  reaches, the limits the roofline assumes for each;
- with `--against`, this table ÷ the other on the cells both measured (any SM share).

`--out` also writes every cell (`roofline_gap.csv`, `table_ratio.csv`). Medians with the range
beside them: one figure per phase would hide that small batches sit far from the peaks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from policies.cost import (
    CostModelError,
    RooflineCostModel,
    TableCostModel,
    roofline_gap,
    table_ratio,
)
from policies.specs import MODEL_PRESETS, SpecError, gpu_spec


def load_table(path: str | Path) -> TableCostModel:
    path = Path(path)
    if path.suffix == ".json":
        return TableCostModel.from_muxserve_json(path, extrapolation="error")
    return TableCostModel.from_profile(path, extrapolation="error")


def summarize(cells: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Per model, TP degree and phase: the number of cells, then median [min–max] of each column."""
    rows = []
    for (model, tp, phase), g in cells.groupby(["model", "tp", "phase"], sort=True):
        row: dict[str, object] = {"model": model, "tp": tp, "phase": phase, "cells": len(g)}
        for column, label in columns.items():
            row[label] = f"{g[column].median():.3g} [{g[column].min():.3g}–{g[column].max():.3g}]"
        rows.append(row)
    return pd.DataFrame(rows)


def report(table_path: str, gpu_name: str, against: str | None, out: Path | None) -> str:
    table = load_table(table_path)
    gap = roofline_gap(table, RooflineCostModel(gpu_spec(gpu_name)), MODEL_PRESETS)
    full = gap[gap["sm_pct"] == 100]
    unknown = sorted({m for m, _ in table.grids} - set(MODEL_PRESETS))
    lines = [f"{table.label} against the roofline of {gpu_name} (cells at 100% SM; median [min–max]):"]
    if full.empty:
        lines.append("  no cell at 100% SM of a known model")
    else:
        prefill = full["phase"] == "prefill"
        full = full.assign(pct_of_its_peak=full["pct_peak_flops"].where(prefill, full["pct_peak_bandwidth"]))
        lines.append(summarize(full, {"ratio": "measured/roofline",
                                      "pct_of_its_peak": "% of peak (prefill FLOP/s, decode bandwidth)"})
                     .to_string(index=False))
    if unknown:
        lines.append(f"  not compared (no model spec): {', '.join(unknown)}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        gap.to_csv(out / "roofline_gap.csv", index=False)
    if against is not None:
        other = load_table(against)
        ratio = table_ratio(table, other)
        lines.append(f"\n{table.label} ÷ {other.label} on the cells both measured (median [min–max]):")
        lines.append(summarize(ratio, {"ratio": "ratio"}).to_string(index=False) if len(ratio) else
                     "  no shared cell (same model, TP, SM share, batch, length and phase)")
        if out is not None:
            ratio.to_csv(out / "table_ratio.csv", index=False)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, help="measured table: MuxServe JSON, or profile CSV/Parquet")
    ap.add_argument("--gpu", default="A100-80GB", help="GPU preset whose datasheet peaks the roofline uses")
    ap.add_argument("--against", help="a second measured table, compared cell by cell")
    ap.add_argument("--out", type=Path, help="folder for the per-cell CSVs")
    args = ap.parse_args(argv)
    try:
        print(report(args.table, args.gpu, args.against, args.out))
    except (CostModelError, SpecError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
