"""Gather a Hydra multirun folder into one table: one row per (job, system), overrides as columns.

    python -m experiments.collect multirun/2026-11-21/12-00-00        # or muxsim-collect
      → <sweep>/collected.csv, collected.parquet, collected_per_llm.csv/.parquet

Each job folder holds summary.csv (written by experiments.run) and .hydra/overrides.yaml; the
override values become columns named by their key (workload.alpha), so plots can group by them.
Jobs that failed or were interrupted before any system finished have no summary and are listed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

log = logging.getLogger("muxsim.collect")


@dataclass
class Collected:
    summary: pd.DataFrame
    per_llm: pd.DataFrame
    missing: list[Path] = field(default_factory=list)  # job folders without a summary


def job_dirs(sweep: Path) -> list[Path]:
    """Hydra job folders (those with .hydra/), numbered ones in numeric order."""
    dirs = {p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml")}
    return sorted(dirs, key=lambda p: (len(p.parts), int(p.name) if p.name.isdigit() else -1, str(p)))


def overrides(job: Path) -> dict[str, object]:
    """key=value overrides of one job, values parsed as YAML (0.7 → float); hydra.* ones left out."""
    lines = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    out: dict[str, object] = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra"):
            continue
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    # Lists (systems=[a,b]) do not fit a column; their text does.
    return {k: (v if isinstance(v, str | int | float | bool) or v is None else str(v)) for k, v in out.items()}


def is_override(column: str) -> bool:
    """Override columns are dotted config keys (workload.alpha); metric names never have a dot but
    the SLO ones (slo_attainment@1.5), which have an @."""
    return "." in column and "@" not in column


def collect(sweep: str | Path) -> Collected:
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep}: not a folder")
    jobs = job_dirs(sweep)
    if not jobs:
        raise FileNotFoundError(f"{sweep}: no Hydra job folders (no .hydra/overrides.yaml below it)")
    summaries, per_llms, missing = [], [], []
    for job in jobs:
        if not (job / "summary.csv").exists():
            missing.append(job)
            continue
        tags = {"job": job.relative_to(sweep).as_posix(), **overrides(job)}
        summaries.append(pd.read_csv(job / "summary.csv").assign(**tags))
        if (job / "per_llm.csv").exists():
            per_llms.append(pd.read_csv(job / "per_llm.csv").assign(**tags))
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    per_llm = pd.concat(per_llms, ignore_index=True) if per_llms else pd.DataFrame()
    first = ["job", *[c for c in summary.columns if is_override(c)], "system"]
    if not summary.empty:
        summary = summary[[*first, *[c for c in summary.columns if c not in first]]]
    return Collected(summary, per_llm, missing)


def write(c: Collected, sweep: Path) -> list[Path]:
    out = []
    for name, df in (("collected", c.summary), ("collected_per_llm", c.per_llm)):
        if df.empty:
            continue
        df.to_csv(sweep / f"{name}.csv", index=False)
        df.to_parquet(sweep / f"{name}.parquet", index=False)
        out += [sweep / f"{name}.csv", sweep / f"{name}.parquet"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="muxsim-collect", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a Hydra multirun folder")
    args = parser.parse_args(argv)
    try:
        c = collect(args.sweep)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for job in c.missing:
        print(f"warning: {job}: no summary.csv (failed or interrupted job)", file=sys.stderr)
    if c.summary.empty:
        print(f"error: {args.sweep}: no job has a summary.csv", file=sys.stderr)
        sys.exit(1)
    paths = write(c, args.sweep)
    print(f"{len(c.summary)} rows ({c.summary['job'].nunique()} jobs × systems) → "
          + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
