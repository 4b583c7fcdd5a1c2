"""From a composed Hydra config to the objects a run needs, and the checks that make bad configs fail
before any simulation starts, in one line that names the key.

Kept apart from run.py so that collect/plot/tests can build workloads and cost models from the same
config without importing Hydra's entry point.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.systems import SYSTEMS
from policies.batching import BATCHING_POLICIES
from policies.cost import (
    CompositeCostModel,
    CostModel,
    CostModelError,
    InterferenceModel,
    RooflineCostModel,
    TableCostModel,
)
from policies.metrics import SLO_SCALES
from policies.placement_algos import PLACERS, PlacerOptions
from policies.specs import GPU_PRESETS, ClusterSpec, GPUSpec, SpecError, model_spec
from traces import Workload, generate, load, power_law_spec

# The Hydra config groups every app composes from (run, place, validate).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the dotted key."""


def absolute(path: str | Path) -> Path:
    """Paths in configs are relative to where the user ran the command, as with any CLI."""
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(path)))
    except ValueError:  # outside a Hydra run (tests, the pre-check): the cwd is the original one
        return Path(path).resolve()


def _require(cfg: DictConfig, key: str, hint: str = "") -> Any:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if node is None or leaf not in node or OmegaConf.is_missing(node, leaf):
        raise ConfigError(f"{key} is required{hint}")
    return node[leaf]


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule} (got {value!r})")


def _number(cfg: DictConfig, key: str, rule: str = "", ok: Callable[[float], bool] = lambda v: True) -> float:
    value = _require(cfg, key)
    _check(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
           key, "a finite number", value)
    _check(ok(value), key, rule, value)
    return float(value)


# ---- systems ----------------------------------------------------------------------------------

def system_policies(system: str) -> tuple[str, str]:
    """(placer, batcher) of a system: a named one, or any "placer+batcher" pair."""
    if system in SYSTEMS:
        return SYSTEMS[system]
    placer, _, batcher = system.partition("+")
    if placer in PLACERS and batcher in BATCHING_POLICIES:
        return placer, batcher
    raise ConfigError(
        f"systems: unknown system {system!r} (known: {', '.join(SYSTEMS)}, or placer+batcher with "
        f"placer in {', '.join(PLACERS)} and batcher in {', '.join(BATCHING_POLICIES)})"
    )


def placement_opts(cfg: DictConfig, placer: str) -> dict[str, Any]:
    """placement.opts apply to the systems whose placer is placement.policy; others keep defaults."""
    if cfg.placement.policy != placer:
        return {}
    opts = OmegaConf.to_container(cfg.placement.opts, resolve=True) or {}
    # YAML lists become tuples, the PlacerOptions field types (hashable, like its defaults).
    return {k: _tuples(v) for k, v in opts.items()}  # type: ignore[union-attr]


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def batching_opts(cfg: DictConfig, batcher: str) -> dict[str, Any]:
    if cfg.batching.policy != batcher:
        return {}
    return dict(OmegaConf.to_container(cfg.batching.opts, resolve=True) or {})  # type: ignore[arg-type]


# ---- cluster, cost, workload --------------------------------------------------------------------

def build_cluster(cfg: DictConfig) -> ClusterSpec:
    c = cfg.cluster
    for key in ("nnodes", "gpus_per_node"):
        value = _require(cfg, f"cluster.{key}")
        _check(isinstance(value, int) and value >= 1, f"cluster.{key}", "an integer ≥ 1", value)
    gpu = c.gpu
    if isinstance(gpu, str):
        _check(gpu in GPU_PRESETS, "cluster.gpu", f"one of {', '.join(GPU_PRESETS)} or a mapping", gpu)
        spec = GPU_PRESETS[gpu]
    else:
        fields = {f.name for f in dataclasses.fields(GPUSpec)}
        given = OmegaConf.to_container(gpu, resolve=True)
        unknown = sorted(set(given) - fields)  # type: ignore[arg-type]
        if unknown:
            raise ConfigError(f"cluster.gpu: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
        try:
            spec = GPUSpec(**given)  # type: ignore[arg-type]
        except TypeError as e:
            raise ConfigError(f"cluster.gpu: {e}") from None
    extra = {"reserve_bytes_per_gpu": int(c.reserve_bytes_per_gpu)} if "reserve_bytes_per_gpu" in c else {}
    return ClusterSpec(int(c.nnodes), int(c.gpus_per_node), spec, **extra)


def _table_path(cfg: DictConfig) -> Path:
    choice = "cost=a100" if cfg.cost.kind == "table" else "cost=profile"
    path = absolute(_require(cfg, "cost.path", f" for {choice} (pass cost.path=FILE)"))
    if not path.is_file():
        raise ConfigError(
            f"cost.path: latency table {path} not found (pass cost.path=FILE, set MUXSIM_A100_TABLE, "
            f"or use cost=roofline)"
        )
    return path


def build_cost(cfg: DictConfig, cluster: ClusterSpec) -> CostModel:
    c = cfg.cost
    kind = c.kind
    if kind == "roofline":
        return RooflineCostModel(cluster.gpu, compute_efficiency=float(c.compute_efficiency),
                                 bandwidth_efficiency=float(c.bandwidth_efficiency),
                                 bw_saturation_share=float(c.bw_saturation_share))
    if kind not in ("table", "profile"):
        raise ConfigError(f"cost.kind must be table, profile or roofline (got {kind!r})")
    _check(c.extrapolation in ("linear", "error"), "cost.extrapolation", "linear or error", c.extrapolation)
    path = _table_path(cfg)
    reader = TableCostModel.from_muxserve_json if kind == "table" else TableCostModel.from_profile
    table = reader(path, extrapolation=c.extrapolation)
    return CompositeCostModel(table, RooflineCostModel(cluster.gpu)) if c.roofline_fallback else table


def build_interference(cfg: DictConfig) -> InterferenceModel | None:
    """The fitted slowdown of jobs sharing SMs, for the simulator; real engines have their own."""
    path = cfg.sim.get("interference")
    if path is None:
        return None
    if cfg.runner.name != "sim":
        raise ConfigError(f"sim.interference: applies to the simulator (runner=sim), not runner={cfg.runner.name}")
    try:
        return InterferenceModel.from_csv(absolute(path))
    except CostModelError as e:
        raise ConfigError(f"sim.interference: {e}") from None


def check_models(cfg: DictConfig) -> list[str]:
    types = list(_require(cfg, "models.types"))
    if not types:
        raise ConfigError("models.types must list at least one model type (got [])")
    for t in types:
        try:
            model_spec(t)
        except SpecError as e:
            raise ConfigError(f"models.types: {e}") from None
    _number(cfg, "models.top_rate", "> 0", lambda v: v > 0)
    return types


def check_workload(cfg: DictConfig) -> None:
    w = cfg.workload
    if w.kind == "synthetic":
        for key, rule, ok in (("alpha", "≥ 0", lambda v: v >= 0), ("scale", "> 0", lambda v: v > 0),
                              ("cv", "> 0", lambda v: v > 0), ("duration_s", "> 0", lambda v: v > 0)):
            _number(cfg, f"workload.{key}", rule, ok)
        _check(isinstance(w.seed, int), "workload.seed", "an integer", w.seed)
    elif w.kind == "trace":
        path = absolute(_require(cfg, "workload.path", f" for workload format {w.format} (pass workload.path=FILE)"))
        if not path.is_file():
            raise ConfigError(f"workload.path: trace {path} not found")
    else:
        raise ConfigError(f"workload.kind must be synthetic or trace (got {w.kind!r})")


def build_workload(cfg: DictConfig) -> Workload:
    w = cfg.workload
    types = check_models(cfg)
    if w.kind == "synthetic":
        spec = power_law_spec(types, float(w.alpha), top_rate=float(cfg.models.top_rate) * float(w.scale))
        return generate(spec, float(w.duration_s), seed=int(w.seed), cv=float(w.cv))
    options = OmegaConf.to_container(w.options, resolve=True) or {}
    workload = load(absolute(w.path), format=w.format, **options)  # type: ignore[arg-type]
    return with_model_types(workload, types)


def with_model_types(workload: Workload, types: Sequence[str]) -> Workload:
    """Traces name LLMs but not their sizes: the i-th LLM to appear gets models.types[i]."""
    if "model_type" in workload.df.columns:
        return workload
    llms = list(pd.unique(workload.df["model"]))
    if len(llms) > len(types):
        raise ConfigError(
            f"models.types: the trace has {len(llms)} LLMs but models={len(types)} types are listed "
            f"(pick a models option with at least {len(llms)})"
        )
    of = dict(zip(llms, types, strict=False))
    return Workload(workload.df.assign(model_type=workload.df["model"].map(of)), workload.meta)


# ---- the highest rate within an SLO ---------------------------------------------------------------

@dataclass(frozen=True)
class MaxRateSearch:
    """Bisection over workload.scale for the highest load a system keeps `target` of its requests
    within `slo_scale` × their standalone latency (MuxServe's "requests within 99% SLO")."""

    slo_scale: float
    target: float
    lo: float
    hi: float
    tolerance: float


def max_rate_search(cfg: DictConfig) -> MaxRateSearch | None:
    """The `max_rate` block of a preset, checked; None when the config has none (most runs)."""
    if cfg.get("max_rate") is None:
        return None
    if cfg.workload.kind != "synthetic":
        raise ConfigError(f"max_rate: the search varies workload.scale, so it needs workload=synthetic "
                          f"(got a {cfg.workload.format} trace)")
    scale = _number(cfg, "max_rate.slo_scale", f"one of {', '.join(f'{k:g}' for k in SLO_SCALES)}",
                    lambda v: v in SLO_SCALES)
    target = _number(cfg, "max_rate.target", "within (0, 1]", lambda v: 0 < v <= 1)
    lo = _number(cfg, "max_rate.lo", "> 0", lambda v: v > 0)
    hi = _number(cfg, "max_rate.hi", f"> max_rate.lo ({lo:g})", lambda v: v > lo)
    tolerance = _number(cfg, "max_rate.tolerance", "within (0, 1)", lambda v: 0 < v < 1)
    return MaxRateSearch(scale, target, lo, hi, tolerance)


# ---- runner -------------------------------------------------------------------------------------

def resolve_runner(cfg: DictConfig) -> Callable[..., Any]:
    """The callable behind runner.target; hwloop may be absent or unfinished, so say so in one line."""
    target = str(cfg.runner.target)
    module, _, attr = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"runner={cfg.runner.name}: {target} is not available ({type(e).__name__}: {e}); "
            f"use runner=sim"
        ) from None
    return fn


# ---- all checks, in the order a reader fixes them -------------------------------------------------

def validate(cfg: DictConfig) -> None:
    """Every check that needs no simulation, so sweeps fail before their first job runs."""
    systems = list(_require(cfg, "systems"))
    if not systems:
        raise ConfigError("systems must list at least one system (got [])")
    for s in systems:
        system_policies(str(s))
    _check(cfg.placement.policy in PLACERS, "placement.policy", f"one of {', '.join(PLACERS)}",
           cfg.placement.policy)
    known = {f.name for f in dataclasses.fields(PlacerOptions)}
    unknown = sorted(set(cfg.placement.opts or {}) - known)
    if unknown:
        raise ConfigError(f"placement.opts: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        PlacerOptions(**placement_opts(cfg, cfg.placement.policy))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"placement.opts: {e}") from None
    policy = cfg.batching.policy
    _check(policy in BATCHING_POLICIES, "batching.policy", f"one of {', '.join(BATCHING_POLICIES)}", policy)
    fields = {f.name for f in dataclasses.fields(BATCHING_POLICIES[policy])}
    unknown = sorted(set(cfg.batching.opts or {}) - fields)
    if unknown:
        raise ConfigError(f"batching.opts: unknown option(s) {', '.join(unknown)} for {policy} (known: {', '.join(sorted(fields))})")
    check_models(cfg)
    check_workload(cfg)
    build_cluster(cfg)
    _check(cfg.cost.kind in ("table", "profile", "roofline"), "cost.kind", "table, profile or roofline",
           cfg.cost.kind)
    if cfg.cost.kind != "roofline":
        _table_path(cfg)
    horizon = cfg.sim.horizon_s
    if horizon is not None:
        _check(isinstance(horizon, int | float) and horizon > 0, "sim.horizon_s", "> 0 or null", horizon)
    build_interference(cfg)
    scales = list(cfg.report.slo_scales)
    _check(all(isinstance(s, int | float) and s > 0 for s in scales), "report.slo_scales",
           "a list of numbers > 0", scales)
    max_rate_search(cfg)
    resolve_runner(cfg)
