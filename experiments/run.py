"""Run one configuration: several systems on the same workload and cluster, with a report.

    python -m experiments.run                                  # the demo (experiment=demo)
    python -m experiments.run workload.alpha=2.1 systems=[muxserve,spatial]
    python -m experiments.run -m workload.alpha=0.7,2.1       # a sweep (joblib launcher)
    python -m experiments.run -m experiment=paper_synthetic    # MuxServe's synthetic figure

Writes into Hydra's run folder: records_<system>.parquet (streamed while simulating, so an
interrupted run keeps them), summary.csv/.json (one row per system), per_llm.csv, placement_<system>.json
and PNG figures. Config errors are reported in one line before any work starts.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments import plots
from experiments.config import (
    CONF_DIR,
    ConfigError,
    batching_opts,
    build_cluster,
    build_cost,
    build_interference,
    build_workload,
    max_rate_search,
    placement_opts,
    resolve_runner,
    system_policies,
    validate,
)
from experiments.interrupt import raise_on_sigterm, signal_of
from experiments.max_rate import find_max_rate
from experiments.systems import check_baseline, place
from policies.cost import InterferenceModel
from policies.records import records_file, write_atomically

log = logging.getLogger("muxsim.run")
def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "this input cannot work": reported in one line, not as a traceback."""
    from policies.cost import CostModelError
    from policies.placement import PlacementError
    from policies.specs import SpecError
    from traces import WorkloadError

    return (ConfigError, CostModelError, PlacementError, SpecError, WorkloadError)


# ---- results ------------------------------------------------------------------------------------

@dataclass
class Results:
    """What a run produced, per system, in the order the systems ran."""

    out_dir: Path
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    per_llm: pd.DataFrame = field(default_factory=pd.DataFrame)
    records: dict[str, pd.DataFrame] = field(default_factory=dict)
    interrupted: bool = False
    exit_status: int = 0  # 128 + the signal that interrupted the run (130 Ctrl-C, 143 SIGTERM)
    plots: list[Path] = field(default_factory=list)

    def all_failed(self) -> list[str]:
        """One line per system none of whose requests finished, with the commonest reasons."""
        lines = []
        for system, records in self.records.items():
            if len(records) and not (records["status"] == "finished").any():
                reasons = records["reason"].value_counts().head(2)
                why = "; ".join(f"{n} × {reason or 'no reason recorded'}" for reason, n in reasons.items())
                lines.append(f"{system}: all {len(records)} requests failed ({why})")
        return lines


def workload_facts(cfg: DictConfig, workload: Any) -> dict[str, Any]:
    """Columns that make a summary row self-describing once sweeps are collected into one table."""
    df = workload.df
    span = float(df["arrival_s"].max() - df["arrival_s"].min()) if len(df) > 1 else math.nan
    facts: dict[str, Any] = {
        "preset": cfg.preset,
        "cluster_gpus": int(cfg.cluster.nnodes) * int(cfg.cluster.gpus_per_node),
        "models": cfg.models.name,
        "n_llms": int(df["model"].nunique()),
        "workload": cfg.workload.get("format", "synthetic"),
        "cost": cfg.cost.kind,
        "rate_rps": len(df) / span if span and span > 0 else math.nan,
        "trace_s": span,
    }
    if cfg.workload.kind == "synthetic":
        facts |= {k: cfg.workload[k] for k in ("alpha", "scale", "cv", "duration_s", "seed")}
        facts["sizing"] = cfg.workload.get("sizing", "duration")
    elif (cfg.workload.get("options") or {}).get("total_requests") is not None:
        facts["sizing"] = f"{cfg.workload.options.total_requests} requests"
    elif cfg.workload.get("format") == "muxserve-yaml":
        facts["sizing"] = "duration"
    return facts


def summary_row(system: str, run: Any, facts: dict[str, Any]) -> dict[str, Any]:
    placer, batcher = system_policies(system)
    stats = {k: v for k, v in run.stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {"system": system, "placer": placer, "batcher": batcher, **facts, **run.summary.overall,
            **{f"stat_{k}": v for k, v in stats.items()},
            "gpus_used": sum(len(u.gpus) for u in run.placement.units)}


# ---- progress ------------------------------------------------------------------------------------

class SimProgress:
    """A tqdm bar of simulated time against the trace end (the simulator reports while arrivals run)."""

    def __init__(self, system: str, total_s: float, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=round(total_s, 1), desc=f"{system:>9}", unit="sim s", disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} sim s "
                                   "[{elapsed}<{remaining}]", leave=True, file=sys.stderr)

    def __call__(self, now: float) -> None:
        self.bar.update(max(0.0, min(now, self.bar.total) - self.bar.n))

    def close(self) -> None:
        self(self.bar.total)
        self.bar.close()


class FileOnly(logging.Filter):
    """Keeps a noisy logger's warnings out of the console (they still reach run.log), counting them."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.count = prefix, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(self.prefix) and record.levelno <= logging.WARNING:
            self.count += 1
            return False
        return True


def console_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


# ---- the run ------------------------------------------------------------------------------------

def run(cfg: DictConfig, out_dir: Path, progress_bars: bool = True) -> Results:
    """Every system of cfg.systems on one workload; partial results are kept on Ctrl-C."""
    validate(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = resolve_runner(cfg)
    cluster = build_cluster(cfg)
    cost = build_cost(cfg, cluster)
    interference = build_interference(cfg)  # fitted once: every system and search step shares it
    workload = build_workload(cfg, cluster, cost)
    facts = workload_facts(cfg, workload)
    log.info("%d requests of %d LLMs over %.1f s (%.1f req/s) on %d GPUs; cost model: %s",
             len(workload.df), facts["n_llms"], facts["trace_s"], facts["rate_rps"], facts["cluster_gpus"],
             getattr(cost, "label", cost))
    horizon = cfg.sim.horizon_s
    bar_total = float(horizon) if horizon is not None else float(workload.df["arrival_s"].max())
    search = max_rate_search(cfg)
    placements = place_all(cfg, cluster, cost, workload)  # every system's, before any simulation
    res = Results(out_dir)
    rows, per_llm = [], []
    # One extrapolation warning per (model, TP) of the table: worth keeping, not worth a screenful.
    quiet = FileOnly("policies.cost")
    for h in console_handlers():
        h.addFilter(quiet)
    try:
        for system in cfg.systems:
            simulate = partial(simulate_system, runner, cfg, system, cluster, cost, interference)
            progress = SimProgress(system, bar_total, bool(cfg.report.progress) and progress_bars)
            records = out_dir / f"records_{system}.parquet" if cfg.report.records else None
            t0 = time.perf_counter()
            try:
                with records_file(records) as writing:  # complete under its name, else .partial.parquet
                    placement, placement_s = placements[system]
                    sr = simulate(workload, writing, progress, placement)
                    sr.stats["placement_s"] = placement_s
            except _user_errors() as e:
                # The SLO baseline places every LLM spatially, so name the system that was running.
                raise type(e)(f"while running {system}: {e}") from None
            finally:
                progress.close()
            log.info("%s: %.1f s wall, %.2f req/s steady-state (%s)", system, time.perf_counter() - t0,
                     sr.summary.overall["steady_throughput_rps"], settled_word(bool(sr.summary.overall["steady_settled"])))
            rows.append(summary_row(system, sr, facts))
            per_llm.append(sr.summary.per_llm.assign(system=system))
            res.records[system] = sr.records
            placement_json = json.dumps(sr.placement.to_dict(), indent=1, default=str)
            write_atomically(out_dir / f"placement_{system}.json", lambda p, text=placement_json: p.write_text(text))
            if search is not None:  # after the row is kept, so Ctrl-C during the search loses only the search
                rows[-1] |= find_max_rate(search, cfg, simulate, system)
    except KeyboardInterrupt as e:
        res.interrupted = True
        res.exit_status = 128 + signal_of(e)
        log.warning("interrupted (%s): writing the %d system(s) that finished", signal_of(e).name, len(rows))
    finally:
        for h in console_handlers():
            h.removeFilter(quiet)
    if quiet.count:
        log.info("cost model: %d warning(s) (extrapolation past the measured table), see %s",
                 quiet.count, out_dir / "run.log")
    res.summary = pd.DataFrame(rows).assign(interrupted=res.interrupted) if rows else pd.DataFrame()
    res.per_llm = pd.concat(per_llm, ignore_index=True) if per_llm else pd.DataFrame()
    write_results(res, cfg)
    return res


def place_all(cfg: DictConfig, cluster: Any, cost: Any, workload: Any) -> dict[str, tuple[Any, float]]:
    """(placement, seconds it took) per system, and the SLO baseline's check, so that a system whose
    placement cannot work is reported before the first system simulates."""
    try:
        check_baseline(workload, cluster, cost)
    except _user_errors() as e:
        raise type(e)(f"SLO baseline (each LLM alone on its spatial GPUs): {e}") from None
    out = {}
    for system in cfg.systems:
        placer, _ = system_policies(system)
        t0 = time.perf_counter()
        try:
            placement = place(placer, workload, cluster, cost, placement_opts=placement_opts(cfg, placer))
        except _user_errors() as e:
            raise type(e)(f"placing {system}: {e}") from None
        out[system] = (placement, time.perf_counter() - t0)
    return out


def simulate_system(runner: Callable[..., Any], cfg: DictConfig, system: str, cluster: Any, cost: Any,
                    interference: InterferenceModel | None, workload: Any, records_path: Path | None = None,
                    progress: Callable[[float], None] | None = None, placement: Any = None) -> Any:
    """One system on one workload, with cfg's placement, batching and simulator settings; `placement`
    when it was computed already (the max-rate search places each probe's workload anew)."""
    placer, batcher = system_policies(system)
    return runner(system if "+" not in system else placer, workload, cluster, cost,
                  placement_opts=placement_opts(cfg, placer), batching_opts=batching_opts(cfg, batcher),
                  mode=cfg.sim.mode, skip_steps=bool(cfg.sim.skip_steps), horizon_s=cfg.sim.horizon_s,
                  records_path=records_path, progress=progress, placement=placement,
                  **_batcher_override(system, batcher), **_interference(interference))


def _interference(model: InterferenceModel | None) -> dict[str, Any]:
    """Only the simulator models interference (validate() refuses it for runner=hwloop)."""
    return {"interference": model} if model is not None else {}


def _batcher_override(system: str, batcher: str) -> dict[str, Any]:
    """A "placer+batcher" system tells run_system which batcher to use; named systems need nothing."""
    return {"batching": batcher} if "+" in system else {}


def write_results(res: Results, cfg: DictConfig) -> None:
    if res.summary.empty:
        return
    write_atomically(res.out_dir / "summary.csv", lambda p: res.summary.to_csv(p, index=False))
    write_atomically(res.out_dir / "summary.json", lambda p: p.write_text(json.dumps(
        {"config": OmegaConf.to_container(cfg, resolve=True), "interrupted": res.interrupted,
         "systems": res.summary.to_dict(orient="records")}, indent=1, default=_json_default)))
    write_atomically(res.out_dir / "per_llm.csv", lambda p: res.per_llm.to_csv(p, index=False))
    if cfg.report.plots:
        res.plots = [
            plots.slo_curves(res.summary, res.out_dir / "slo_attainment.png"),
            plots.per_llm_throughput(res.per_llm, res.out_dir / "per_llm_throughput.png"),
            plots.latency_cdfs(res.records, res.out_dir / "latency_cdf.png"),
        ]
        if "max_rate_within_slo_rps" in res.summary.columns:
            res.plots.append(plots.max_rate(res.summary, res.out_dir / "max_rate_within_slo.png"))


def _json_default(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


# ---- the report -----------------------------------------------------------------------------------

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, bool | np.bool_):  # a flag read back from the summary table is numpy's
        return "yes" if value else "no"
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def settled_word(settled: bool) -> str:
    """How a log line names the steady-state figure's standing (policies.metrics.settling)."""
    return "settled" if settled else "unsettled: the run is too short to say"


def report(res: Results, cfg: DictConfig) -> None:
    """The comparison table and ratios; systems that did not run are simply absent."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))  # a pipe reports 80 columns
    if res.summary.empty:
        console.print(f"[yellow]no system finished[/]; records of the interrupted one, if any: {res.out_dir}")
        return
    s = res.summary.set_index("system")
    first = s.iloc[0]
    console.print(f"[bold]muxsim {cfg.preset}[/]: {_count(first['n_llms'], 'LLM')} on {_count(first['cluster_gpus'], 'GPU')}, "
                  f"{first['rate_rps']:.1f} req/s offered over {first['trace_s']:.0f} s of trace")
    perf = [("paper's tpt\nreq/s", "rate_weighted_throughput_rps", ".2f"),
            ("steady tpt\nreq/s", "steady_throughput_rps", ".2f"), ("± s.e.\nreq/s", "steady_throughput_se_rps", ".2f"),
            ("steady\noffered", "steady_offered_rps", ".2f"), ("throughput\ntok/s", "tokens_per_s", ".0f"),
            ("TTFT p50\ns", "ttft_p50_s", ".3f"), ("TTFT p99\ns", "ttft_p99_s", ".2f"),
            ("TPOT p50\ns/tok", "tpot_p50_s", ".3f"), ("TPOT p99\ns/tok", "tpot_p99_s", ".3f"),
            ("latency p99\ns", "latency_p99_s", ".2f")]
    health = [(f"SLO@{k:g}\n%", f"slo_attainment@{k:g}", ".1%") for k in cfg.report.slo_scales]
    health += [("preemptions", "preemptions", ".0f"), ("failed", "failed", ".0f"), ("GPUs\nused", "gpus_used", ".0f"),
               ("steady\nwarm-up s", "steady_warmup_s", ".0f"), ("steady\ndrift t", "steady_drift_t", ".1f"),
               ("steady\nsettled", "steady_settled", "")]
    for title, columns in (("throughput and latency", perf),
                           ("SLO attainment within k × standalone latency; preemptions, failures; the steady "
                            "window's detected warm-up, the drift between its halves (Student's t)", health)):
        table = Table(title=title)
        table.add_column("system", style="bold", no_wrap=True, min_width=max(len(str(x)) for x in s.index))
        for name, *_ in columns:
            table.add_column(name, justify="right")
        for system, row in s.iterrows():
            table.add_row(str(system), *(_fmt(row.get(key), spec).rstrip("%") for _, key, spec in columns))
        console.print(table)
    within = s.get("max_rate_within_slo_rps")  # only where the preset searched for it
    if within is not None:
        console.print(f"highest rate with ≥ {first['max_rate_target']:.0%} of requests within "
                      f"{first['max_rate_slo_scale']:g}× standalone latency: "
                      + ", ".join(f"{system} {rate:.1f} req/s" for system, rate in within.items()))
    console.print("paper's tpt: MuxServe's throughput, the rate-weighted mean of per-LLM requests ÷ makespan "
                  "(drain included, so it moves with the trace length); steady tpt: requests served per "
                  "second over the arrival window after the warm-up, drain excluded, ± its standard error "
                  "(batch means). The warm-up is detected "
                  "(MSER-5 on the served counts per second); settled: no means the served rate was still "
                  "moving (MSER's best cut lay past half the run, or what it kept drifts between its halves) "
                  "or the run was too short to tell, so the steady figure is not yet the system's own: run "
                  "a longer trace")
    for base in ("spatial", "temporal"):
        if "muxserve" in s.index and base in s.index:
            console.print(f"muxserve vs {base}: {ratio_line(s, 'muxserve', base, within)}")
    if res.interrupted:
        console.print("[yellow]interrupted: partial results[/]")
    console.print(f"results: {res.out_dir}")
    for p in res.plots:
        console.print(f"plot: {p}")


def ratio_line(s: pd.DataFrame, system: str, base: str, within: pd.Series | None) -> str:
    """Both throughput ratios, each named by the figure it divides, then latency and SLO rate."""
    def ratio(col: str) -> str:
        a, b = s.loc[system].get(col, math.nan), s.loc[base].get(col, math.nan)
        return f"{a / b:.2f}×" if b and b > 0 and not math.isnan(a) else "–"

    def steady_error() -> str:
        """The ratio's standard error from both figures' (relative errors add in quadrature)."""
        a, b = (s.loc[name] for name in (system, base))
        rel = math.hypot(a.get("steady_throughput_se_rps", math.nan) / a["steady_throughput_rps"],
                         b.get("steady_throughput_se_rps", math.nan) / b["steady_throughput_rps"])
        return "" if math.isnan(rel) else f" ± {rel * a['steady_throughput_rps'] / b['steady_throughput_rps']:.2f}"

    p99 = s.loc[base, "latency_p99_s"] / s.loc[system, "latency_p99_s"]
    slo = f", {within[system] / within[base]:.2f}× the rate within SLO" if (
        within is not None and within[base] > 0) else ""
    unsettled = [name for name in (system, base) if not s.loc[name].get("steady_settled", True)]
    flag = f" (unsettled: {', '.join(unsettled)})" if unsettled else ""
    return (f"{ratio('steady_throughput_rps')}{steady_error()} steady-state throughput{flag}, "
            f"{ratio('rate_weighted_throughput_rps')} paper's throughput (requests ÷ makespan), "
            f"{p99:.2f}× lower P99 latency{slo}")


# ---- entry points ---------------------------------------------------------------------------------

@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> float | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    # Parallel sweep jobs share one terminal: no bars, one line per system instead of tables.
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        res = run(cfg, out_dir, progress_bars=not multirun)
    except _user_errors() as e:
        if multirun:
            raise
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # before the first system started: nothing to keep
        print("interrupted before any system ran", file=sys.stderr)
        sys.exit(128 + signal_of(e))
    if multirun:
        overrides = " ".join(HydraConfig.get().overrides.task)
        for row in res.summary.itertuples():
            log.info("[%s] %s: %.2f req/s steady-state (%s), %.2f req/s paper's, P99 latency %.2f s → %s",
                     overrides, row.system, row.steady_throughput_rps, settled_word(bool(row.steady_settled)),
                     row.rate_weighted_throughput_rps, row.latency_p99_s, out_dir)
    else:
        report(res, cfg)
    if res.interrupted:
        sys.exit(res.exit_status)
    failed = res.all_failed()
    if failed:  # a sweep goes on with its other jobs; a single run says so in its exit status
        message = f"RunError: no request finished under {'; '.join(failed)}"
        if multirun:
            log.error("%s", message)
        else:
            print(message, file=sys.stderr)
            sys.exit(1)
    # The sweep's objective, for optimising sweepers: the first system's throughput.
    return float(res.summary["throughput_rps"].iloc[0]) if not res.summary.empty else None


def main() -> None:
    from experiments.precheck import exit_on, precheck

    exit_on(precheck(sys.argv[1:]))
    raise_on_sigterm()
    _hydra_main()


if __name__ == "__main__":
    main()
