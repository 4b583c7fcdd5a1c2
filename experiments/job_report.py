"""Every job of a validation run read against its profile, one job at a time.

    python -m experiments.job_report RUN_FOLDER            # the folder `experiments.validate` wrote
    python -m experiments.job_report RUN_FOLDER --phase decode

`experiments.validate` reports each run's summed job time over the profile's (`decode steps ÷
profile`, `prefill steps ÷ profile`). This splits that ratio by what the simulator's runner terms
are keyed on, for the simulator and the hardware side by side: the step's tokens, whether the
worker had run that token count before in the same run (`seen`: the new-shape term is charged to
the others), and how long the worker sat idle before the job. A gap that stays when every term's
condition is the same on both sides is a cost no term holds. The profile and placement are the
run's own (its `profiles/` copies, `summary.json` config and saved workloads).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.config import ConfigError
from experiments.validate import build_setup, plan, profile_frame, profiled_times
from policies.cost import TableCostModel
from traces.schema import Workload

TOKEN_BINS = (0, 32, 64, 128, 256, 512, 1 << 20)
IDLE_BINS_MS = (-np.inf, 2.0, 20.0, np.inf)
IDLE_LABELS = ("back to back (≤ 2 ms)", "idle 2–20 ms", "idle > 20 ms")


def run_config(run: Path) -> DictConfig:
    """The config a finished `experiments.validate` run folder was run with (its `summary.json`)."""
    summary = run / "summary.json"
    if not summary.exists():
        raise ConfigError(f"{run}: no summary.json (not a finished `experiments.validate` run folder)")
    config = json.loads(summary.read_text())["config"]
    if "models" in config and "shapes" not in config:  # a folder from before the list was renamed
        config["shapes"] = config.pop("models")
    return OmegaConf.create(config)


def run_table(run: Path) -> TableCostModel:
    """The run's own profile (its `profiles/` copies), every model in one table."""
    return TableCostModel.from_frame(profile_frame(sorted((run / "profiles").glob("*.parquet"))), label="the run's")


def job_ratios(run: Path) -> pd.DataFrame:
    """One row per job of every job log in `run`: `system, level, executor, repeat` (−1: the
    simulator), the log's columns, `took_s`, `profiled_s` (`policies.cost.profiled_job_time` on the
    run's own profile and placement), `ratio`, `seen` (the worker ran a first step of this many
    tokens, `policies.ledger.Batch.step_tokens`, earlier in the run) and `idle_ms` (since the same
    worker's last job ended)."""
    s = build_setup(run_config(run))
    table = run_table(run)
    parts, costs = [], {}
    for path in sorted(run.glob("jobs_*_L*_*.parquet")):
        system, level, who = path.stem.split("_")[1:]
        if (system, level) not in costs:  # one placement per system and level, its logs all read against it
            workload = Workload.read(run / f"workload_{system}_{level}.parquet")
            costs[system, level] = plan(system, s, table, workload).cost
        jobs = pd.read_parquet(path).sort_values("start_s", kind="stable")
        jobs["profiled_s"] = profiled_times(jobs, costs[system, level], s.specs)
        worker = [jobs["unit"], jobs["llm"], jobs["phase"]]
        jobs = jobs.assign(system=system, level=int(level[1:]), executor="sim" if who == "sim" else "hw",
                           repeat=-1 if who == "sim" else int(who[2:]), took_s=jobs["end_s"] - jobs["start_s"],
                           seen=jobs.groupby([*worker, jobs["admitted_context"] + jobs["decoding"]]).cumcount() > 0,
                           idle_ms=1e3 * (jobs["start_s"] - jobs.groupby(worker)["end_s"].shift()))
        parts.append(jobs.assign(ratio=jobs["took_s"] / jobs["profiled_s"]))
    if not parts:
        raise ConfigError(f"{run}: no job logs (jobs_*.parquet)")
    return pd.concat(parts, ignore_index=True)


def job_table(jobs: pd.DataFrame, phase: str) -> pd.DataFrame:
    """Median ratio and job count per executor, by tokens (prompts for `prefill`, decoding requests
    for `decode`), seen and idle time: jobs admitting prompts, or pure decodes."""
    prefill = phase == "prefill"
    jobs = jobs[(jobs["admitted"] > 0) if prefill else (jobs["admitted"] == 0)]
    tokens = jobs["admitted_context"] if prefill else jobs["decoding"]
    keys = [pd.cut(tokens, TOKEN_BINS, right=True).rename("prompt tokens" if prefill else "batch"),
            jobs["seen"], pd.cut(jobs["idle_ms"].fillna(np.inf), IDLE_BINS_MS, labels=IDLE_LABELS).rename("before")]
    grouped = jobs.groupby([*keys, jobs["executor"]], observed=True)["ratio"].agg(["median", "size"])
    return grouped.unstack("executor").dropna(how="all")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a folder `python -m experiments.validate` wrote")
    ap.add_argument("--phase", choices=("prefill", "decode"), default="prefill")
    args = ap.parse_args()
    try:
        jobs = job_ratios(args.run)
    except ConfigError as e:
        sys.exit(f"ConfigError: {e}")
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        for system, g in jobs.groupby("system"):
            print(f"{system}: job time ÷ profile (median) and jobs, per executor\n"
                  f"{job_table(g, args.phase).round(3).to_string()}\n")


if __name__ == "__main__":
    main()
