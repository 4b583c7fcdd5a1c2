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
from omegaconf import DictConfig, ListConfig, OmegaConf

from experiments.systems import SYSTEMS
from policies.batching import BATCHING_POLICIES, FIXED_FIELDS
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
from policies.view import EXECUTION_MODES
from traces import FORMATS, Workload, WorkloadError, generate, load, power_law_spec
from traces.loaders import check_options
from traces.ops import skip_idle
from traces.synthetic import MAX_CV, check_size

# Peak memory of a whole run per request (generation, simulation, records, summary): 0.8-2.1 KiB,
# measured as the growth of peak RSS over 23k- and 46k-request roofline runs of one system. An
# estimate, used only to refuse a workload that cannot fit before anything is allocated.
RUN_BYTES_PER_REQUEST = 2048

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


def _mapping(cfg: DictConfig, key: str) -> dict[str, Any]:
    """A block of options: a mapping, or null for none."""
    node = OmegaConf.select(cfg, key)
    if node is None:
        return {}
    _check(isinstance(node, DictConfig), key, "a mapping of options (or null)", node)
    return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]


def _flag(cfg: DictConfig, key: str) -> bool:
    value = _require(cfg, key)
    _check(isinstance(value, bool), key, "true or false", value)
    return value


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
    """placement.opts apply to the systems whose placer is placement.policy; others keep defaults,
    except that the spatial placer always takes the top-level `spatial` block (rule, gpus)."""
    base = spatial_opts(cfg) if placer == "spatial" else {}
    if cfg.placement.policy != placer:
        return base
    # YAML lists become tuples, the PlacerOptions field types (hashable, like its defaults).
    return base | {k: _tuples(v) for k, v in _mapping(cfg, "placement.opts").items()}


def spatial_opts(cfg: DictConfig) -> dict[str, Any]:
    """The `spatial` block as PlacerOptions fields; absent (older configs): the paper's rule."""
    if OmegaConf.select(cfg, "spatial") is None:
        return {}
    gpus = _mapping(cfg, "spatial.gpus")
    return {"spatial_rule": OmegaConf.select(cfg, "spatial.rule", default="paper"),
            "spatial_gpus": tuple((str(k), v) for k, v in gpus.items())}


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def batching_opts(cfg: DictConfig, batcher: str) -> dict[str, Any]:
    if cfg.batching.policy != batcher:
        return {}
    return _mapping(cfg, "batching.opts")


# ---- cluster, cost, workload --------------------------------------------------------------------

def build_cluster(cfg: DictConfig) -> ClusterSpec:
    c = cfg.cluster
    for key in ("nnodes", "gpus_per_node"):
        value = _require(cfg, f"cluster.{key}")
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"cluster.{key}",
               "an integer ≥ 1", value)
    gpu = c.gpu
    if isinstance(gpu, str):
        _check(gpu in GPU_PRESETS, "cluster.gpu", f"one of {', '.join(GPU_PRESETS)} or a mapping", gpu)
        spec = GPU_PRESETS[gpu]
    else:
        _check(isinstance(gpu, DictConfig), "cluster.gpu", f"one of {', '.join(GPU_PRESETS)} or a mapping", gpu)
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
    table = check_cost(cfg)
    if table is None:
        return RooflineCostModel(cluster.gpu, compute_efficiency=float(c.compute_efficiency),
                                 bandwidth_efficiency=float(c.bandwidth_efficiency),
                                 bw_saturation_share=float(c.bw_saturation_share))
    return CompositeCostModel(table, RooflineCostModel(cluster.gpu)) if c.roofline_fallback else table


def check_cost(cfg: DictConfig) -> TableCostModel | None:
    """Every cost key checked, and the measured table read (None for the roofline)."""
    kind = _require(cfg, "cost.kind")
    _check(kind in ("table", "profile", "roofline"), "cost.kind", "table, profile or roofline", kind)
    if kind == "roofline":
        for key in ("compute_efficiency", "bandwidth_efficiency", "bw_saturation_share"):
            _number(cfg, f"cost.{key}", "within (0, 1]", lambda v: 0 < v <= 1)
        return None
    extrapolation = _require(cfg, "cost.extrapolation")
    _check(extrapolation in ("linear", "error"), "cost.extrapolation", "linear or error", extrapolation)
    _flag(cfg, "cost.roofline_fallback")
    return read_table(cfg)


def read_table(cfg: DictConfig) -> TableCostModel:
    """The measured table at cost.path, every cell checked (`policies.cost.cell_problem`)."""
    path = _table_path(cfg)
    reader = TableCostModel.from_muxserve_json if cfg.cost.kind == "table" else TableCostModel.from_profile
    try:
        return reader(path, extrapolation=cfg.cost.extrapolation)
    except CostModelError as e:
        raise ConfigError(f"cost.path: {e}") from None


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
    node = _require(cfg, "models.types")
    _check(isinstance(node, ListConfig), "models.types", "a list of model types", node)
    types = list(node)
    if not types:
        raise ConfigError("models.types must list at least one model type (got [])")
    for t in types:
        _check(isinstance(t, str), "models.types", "a list of model type names", t)
        try:
            model_spec(t)
        except SpecError as e:
            raise ConfigError(f"models.types: {e}") from None
    _number(cfg, "models.top_rate", "> 0", lambda v: v > 0)
    return types


def check_workload(cfg: DictConfig) -> None:
    w = cfg.workload
    kind = _require(cfg, "workload.kind")
    if kind == "synthetic":
        for key, rule, ok in (("alpha", "≥ 0", lambda v: v >= 0), ("scale", "> 0", lambda v: v > 0),
                              ("cv", f"within (0, {MAX_CV:g}]", lambda v: 0 < v <= MAX_CV),
                              ("duration_s", "> 0", lambda v: v > 0)):
            _number(cfg, f"workload.{key}", rule, ok)
        seed = _require(cfg, "workload.seed")
        _check(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, "workload.seed",
               "an integer ≥ 0", seed)
        sizing = w.get("sizing", "duration")
        _check(sizing in ("duration", "paper"), "workload.sizing", "duration or paper", sizing)
        types = check_models(cfg)
        try:
            spec = power_law_spec(types, float(w.alpha), top_rate=float(cfg.models.top_rate) * float(w.scale))
            check_size(spec, float(w.duration_s), RUN_BYTES_PER_REQUEST, "running them")
        except WorkloadError as e:
            raise ConfigError(f"workload.scale: {e} (lower workload.scale, workload.duration_s or "
                              "models.top_rate)") from None
    elif kind == "trace":
        fmt = _require(cfg, "workload.format")
        _check(fmt in FORMATS, "workload.format", f"one of {', '.join(FORMATS)}", fmt)
        path = absolute(_require(cfg, "workload.path", f" for workload format {fmt} (pass workload.path=FILE)"))
        if not path.is_file():
            raise ConfigError(f"workload.path: trace {path} not found")
        try:
            check_options(fmt, _mapping(cfg, "workload.options"))
        except WorkloadError as e:
            raise ConfigError(f"workload.options: {e}") from None
    else:
        raise ConfigError(f"workload.kind must be synthetic or trace (got {kind!r})")


def build_workload(cfg: DictConfig, cluster: ClusterSpec | None = None, cost: CostModel | None = None) -> Workload:
    """The run's requests: generated or loaded, with idle gaps past `traces.ops.MAX_IDLE_GAP_S`
    shortened (a warning says so), and refused in one line when they have no request rate.

    `workload.sizing=paper` places the spec first (with `cluster` and `cost`, built from cfg when not
    given) to size each LLM as MuxServe's benchmark did."""
    w = cfg.workload
    types = check_models(cfg)
    if w.kind == "synthetic":
        spec = power_law_spec(types, float(w.alpha), top_rate=float(cfg.models.top_rate) * float(w.scale))
        sizing = w.get("sizing", "duration")
        _check(sizing in ("duration", "paper"), "workload.sizing", "duration or paper", sizing)
        counts = None
        if sizing == "paper":
            from experiments.sizing import paper_counts

            cluster = cluster or build_cluster(cfg)
            counts = paper_counts(spec, cluster, cost or build_cost(cfg, cluster), placement_opts(cfg, "muxserve"))
        workload = generate(spec, float(w.duration_s), seed=int(w.seed), cv=float(w.cv), counts=counts)
    else:
        workload = with_model_types(load(absolute(w.path), format=w.format, **_mapping(cfg, "workload.options")), types)
    if workload.duration_s <= 0:
        where = f"workload.path: {w.path}" if w.kind == "trace" else "workload.duration_s"
        raise ConfigError(f"{where}: its {len(workload)} request(s) all arrive at "
                          f"{workload.df['arrival_s'].iloc[0]:g} s, so the workload has no request rate "
                          "(it needs at least two distinct arrival times)")
    return skip_idle(workload)


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
    node = _require(cfg, "systems")
    _check(isinstance(node, ListConfig), "systems", "a list of systems", node)
    if not node:
        raise ConfigError("systems must list at least one system (got [])")
    systems = [str(s) for s in node]
    for s in systems:
        system_policies(s)
    twice = sorted({s for s in systems if systems.count(s) > 1})
    if twice:
        raise ConfigError(f"systems: {', '.join(twice)} listed twice (each system's files are named after it)")
    check_placement_opts(cfg)
    check_batching_opts(cfg)
    check_models(cfg)
    check_workload(cfg)
    build_cluster(cfg)
    check_cost(cfg)
    check_sim(cfg)
    build_interference(cfg)
    check_report(cfg)
    max_rate_search(cfg)
    resolve_runner(cfg)


def check_placement_opts(cfg: DictConfig) -> None:
    policy = _require(cfg, "placement.policy")
    _check(policy in PLACERS, "placement.policy", f"one of {', '.join(PLACERS)}", policy)
    known = {f.name for f in dataclasses.fields(PlacerOptions)}
    unknown = sorted(set(_mapping(cfg, "placement.opts")) - known)
    if unknown:
        raise ConfigError(f"placement.opts: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        PlacerOptions(**placement_opts(cfg, policy))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"placement.opts.{e}" if str(e).split(" ")[0] in known else f"placement.opts: {e}") from None
    try:
        PlacerOptions(**spatial_opts(cfg))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"spatial: {e}".replace("spatial_rule", "rule").replace("spatial_gpus", "gpus")) from None


def check_batching_opts(cfg: DictConfig) -> None:
    policy = _require(cfg, "batching.policy")
    _check(policy in BATCHING_POLICIES, "batching.policy", f"one of {', '.join(BATCHING_POLICIES)}", policy)
    fields = {f.name for f in dataclasses.fields(BATCHING_POLICIES[policy])} - set(FIXED_FIELDS)
    opts = _mapping(cfg, "batching.opts")
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise ConfigError(f"batching.opts: unknown option(s) {', '.join(unknown)} for {policy} (known: {', '.join(sorted(fields))})")
    try:
        BATCHING_POLICIES[policy](**opts)
    except ValueError as e:
        raise ConfigError(f"batching.opts.{e}") from None


def check_sim(cfg: DictConfig) -> None:
    mode = _require(cfg, "sim.mode")
    _check(mode in EXECUTION_MODES, "sim.mode", " or ".join(EXECUTION_MODES), mode)
    _flag(cfg, "sim.skip_steps")
    horizon = _require(cfg, "sim.horizon_s")
    if horizon is not None:
        _number(cfg, "sim.horizon_s", "> 0 or null", lambda v: v > 0)


def check_report(cfg: DictConfig) -> None:
    scales = _require(cfg, "report.slo_scales")
    _check(isinstance(scales, ListConfig) and len(scales) > 0
           and all(isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) and s > 0
                   for s in scales), "report.slo_scales", "a non-empty list of numbers > 0", scales)
    for key in ("progress", "plots", "records"):
        _flag(cfg, f"report.{key}")
