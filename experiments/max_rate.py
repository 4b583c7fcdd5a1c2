"""The highest rate a system serves within an SLO, by bisection over workload.scale.

MuxServe's second headline is "requests served within 99% SLO attainment": the highest load at
which 99% of requests finish within k × their standalone latency. Each probe simulates the whole
workload again at one scale, so a search costs a handful of runs per system; the `max_rate` preset
keeps its traces short for that reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.config import MaxRateSearch, build_workload
from policies.metrics import max_rate_within_slo
from traces import Workload, power_law_spec

log = logging.getLogger("muxsim.max_rate")


def offered_rate(cfg: DictConfig, scale: float) -> float:
    """Total rate (req/s) the synthetic workload offers at `scale`: the spec's, not a trace's count,
    so every system's answer is on the same axis whatever its probes happened to draw."""
    spec = power_law_spec(list(cfg.models.types), float(cfg.workload.alpha),
                          top_rate=float(cfg.models.top_rate) * scale)
    return math.fsum(llm.rate for llm in spec.llms)


def at_scale(cfg: DictConfig, scale: float) -> DictConfig:
    """A copy of cfg whose workload runs at `scale`; everything else (seed, α, lengths) unchanged."""
    return OmegaConf.merge(cfg, {"workload": {"scale": scale}})  # type: ignore[return-value]


def find_max_rate(search: MaxRateSearch, cfg: DictConfig, simulate: Callable[[Workload], Any],
                  system: str = "") -> dict[str, float]:
    """Summary columns for one system; `simulate(workload)` runs it and returns its SystemRun."""
    column = f"slo_attainment@{search.slo_scale:g}"
    probes = 0

    def attainment_at(scale: float) -> float:
        nonlocal probes
        probes += 1
        attainment = float(simulate(build_workload(at_scale(cfg, scale))).summary.overall[column])
        log.info("%s: scale %.3f (%.1f req/s): %.2f%% within %g× standalone latency", system, scale,
                 offered_rate(cfg, scale), 100 * attainment, search.slo_scale)
        return attainment

    scale = max_rate_within_slo(attainment_at, search.lo, search.hi, search.target, search.tolerance)
    return {"max_rate_slo_scale": search.slo_scale, "max_rate_target": search.target,
            "max_rate_lo": search.lo, "max_rate_hi": search.hi, "max_rate_scale": scale, "max_rate_within_slo_rps": offered_rate(cfg, scale) if scale else 0.0,
            "max_rate_probes": probes}
