"""The paper's figures from a sweep folder (collected on the fly) or a collected table.

    python -m experiments.plot multirun/…/12-00-00            # or muxsim-plot
    python -m experiments.plot collected.parquet --out figs/

Draws what the table supports: throughput vs α and the SLO curves per α (α swept), P99 latency vs
offered rate (rate swept), throughput and SLO attainment at 8× vs offered rate (ChatLMSYS levels swept), the highest rate within 99% SLO (a max_rate_within_slo_rps column), and
per-LLM throughput bars for one job's placements (--job, default the first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments import plots
from experiments.collect import collect, is_override, write


def read_tables(source: Path) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """(summary, per-LLM, default output folder) from a sweep folder or a collected table file."""
    if source.is_dir():
        c = collect(source)
        return c.summary, c.per_llm, source / "figures"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    summary = _read(source)
    # collected.csv has collected_per_llm.csv beside it; a single run's summary.csv has per_llm.csv.
    siblings = [source.with_name(source.stem + "_per_llm" + source.suffix), source.with_name("per_llm.csv")]
    sibling = next((p for p in siblings if p.exists()), None)
    per_llm = _read(sibling) if sibling else pd.DataFrame()
    return summary, per_llm, source.parent / "figures"


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def swept(df: pd.DataFrame, *names: str) -> str | None:
    """The first of `names` that is a column with more than one value."""
    return next((n for n in names if n in df.columns and df[n].nunique() > 1), None)


def make_figures(summary: pd.DataFrame, per_llm: pd.DataFrame, out: Path, job: str | None = None) -> list[Path]:
    if summary.empty:
        raise ValueError("the table is empty")
    paths = []
    alpha = swept(summary, "workload.alpha", "alpha")
    if alpha:
        paths.append(plots.throughput_vs_alpha(summary, out / "throughput_vs_alpha.png", alpha=alpha))
    level = swept(summary, "chatlmsys.condense")  # experiment=chatlmsys: MuxServe's load levels
    paths.append(plots.slo_curves(summary, out / "slo_attainment.png", by=alpha or level))
    rate = swept(summary, "rate_rps")
    if rate and swept(summary, "workload.scale", "scale", "workload.alpha", "alpha", "chatlmsys.condense"):
        paths.append(plots.p99_vs_rate(summary, out / "p99_latency_vs_rate.png"))
    if rate and level:
        paths.append(plots.throughput_vs_rate(summary, out / "throughput_vs_rate.png"))
        if "slo_attainment@8" in summary.columns:
            paths.append(plots.slo_vs_rate(summary, out / "slo_attainment_at_8_vs_rate.png", scale=8))
    if "max_rate_within_slo_rps" in summary.columns:
        paths.append(plots.max_rate(summary, out / "max_rate_within_slo.png", by=alpha))
    if not per_llm.empty:
        chosen = job if job is not None else str(per_llm["job"].iloc[0]) if "job" in per_llm.columns else None
        part = per_llm if chosen is None else per_llm[per_llm["job"].astype(str) == chosen]
        if part.empty:
            raise ValueError(f"no job {chosen!r} in the per-LLM table (jobs: {', '.join(map(str, per_llm['job'].unique()))})")
        about = _describe_job(summary, chosen)
        paths.append(plots.per_llm_throughput(part, out / "per_llm_throughput.png",
                                              title="Per-LLM throughput" + (f" ({about})" if about else "")))
    return paths


def _describe_job(summary: pd.DataFrame, job: str | None) -> str:
    """The job's overrides, e.g. "workload.alpha=0.7", so the bars say which placement they show."""
    if job is None or "job" not in summary.columns:
        return ""  # a single run's table
    row = summary[summary["job"].astype(str) == job].iloc[0]
    keys = [c for c in summary.columns if is_override(c)]
    return ", ".join(f"{k}={row[k]}" for k in keys) or f"job {job}"


class CollectAndPlot(Callback):
    """Hydra callback (hydra.callbacks): at the end of a multirun, collect it and draw its figures."""

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            c = collect(sweep)
            if c.summary.empty:
                print(f"collect: {sweep}: no job finished", file=sys.stderr)
                return
            tables = write(c, sweep)
            paths = make_figures(c.summary, c.per_llm, sweep / "figures")
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"collect/plot: {e}", file=sys.stderr)
            return
        print(f"sweep: {len(c.summary)} rows → {tables[0]}")
        for p in paths:
            print(f"plot: {p}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="muxsim-plot", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a multirun folder, or collected.csv/.parquet")
    parser.add_argument("--out", type=Path, help="output folder (default: figures/ next to the source)")
    parser.add_argument("--job", help="job whose per-LLM throughput to draw (default: the first)")
    args = parser.parse_args(argv)
    try:
        summary, per_llm, default_out = read_tables(args.source)
        paths = make_figures(summary, per_llm, args.out or default_out, args.job)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for p in paths:
        print(f"plot: {p}")


if __name__ == "__main__":
    main()
