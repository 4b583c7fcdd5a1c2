"""Workload specs: which LLMs are served, of which model type, at which request rate.

A spec is what placement needs before any request exists (rates per LLM), and what the generator
turns into requests. MuxServe's synthetic set-up and its models YAML both become this one type, so
the rest of the project never needs to know where the rates came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from traces.schema import WorkloadError


@dataclass(frozen=True)
class ServedLLM:
    """One served LLM instance. Several instances may share a model type (12 × llama-7b)."""

    name: str  # instance name, the `model` column of the Workload, e.g. "llm-3"
    model_type: str  # architecture/size, e.g. "llama-7b"; what the cost model is keyed by
    rate: float  # mean request rate, req/s


@dataclass(frozen=True)
class Cluster:
    """The GPUs available: meshes never span nodes, so the node shape matters, not just the total."""

    nnodes: int
    ngpus_per_node: int

    @property
    def ngpus(self) -> int:
        return self.nnodes * self.ngpus_per_node


@dataclass(frozen=True)
class WorkloadSpec:
    """The served LLMs in popularity order, with an optional cluster (from a MuxServe YAML)."""

    llms: tuple[ServedLLM, ...]
    cluster: Cluster | None = None
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "llms", tuple(self.llms))  # a list is accepted, stored immutably
        names = [m.name for m in self.llms]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise WorkloadError(f"{self.label or '<spec>'}: duplicate LLM name {dup!r}")
        for m in self.llms:
            if not np.isfinite(m.rate) or m.rate < 0:
                raise WorkloadError(
                    f"{self.label or '<spec>'}: LLM {m.name!r}: rate must be a finite number >= 0 "
                    f"(got {m.rate!r})"
                )

    @property
    def total_rate(self) -> float:
        return float(sum(m.rate for m in self.llms))

    def rates(self) -> dict[str, float]:
        return {m.name: m.rate for m in self.llms}

    def model_types(self) -> dict[str, str]:
        return {m.name: m.model_type for m in self.llms}

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for Workload metadata and JSON/YAML output."""
        return asdict(self)


def power_law_rates(
    n: int, alpha: float, *, top_rate: float | None = None, total_rate: float | None = None
) -> np.ndarray:
    """Rates r_i ∝ (i+1)^−α for i = 0..n−1, scaled so r_0 = top_rate or Σ r_i = total_rate.

    Exactly one of the two scales must be given: MuxServe fixes the top LLM's rate, while sweeps
    over cluster load are easier to read with a fixed total.
    """
    if n <= 0:
        raise WorkloadError(f"power_law_rates: need at least one LLM (got n={n})")
    if alpha < 0:
        raise WorkloadError(f"power_law_rates: alpha must be >= 0 (got {alpha})")
    if (top_rate is None) == (total_rate is None):
        raise WorkloadError("power_law_rates: give exactly one of top_rate or total_rate")
    weights = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    if top_rate is not None:
        return top_rate * weights / weights[0]
    assert total_rate is not None
    return total_rate * weights / weights.sum()


# Paper set-up: popularity follows this list order, so the small models are the most popular.
MUXSERVE_SYNTHETIC_MODELS: tuple[str, ...] = (
    ("llama-7b",) * 12 + ("llama-13b",) * 4 + ("llama-30b",) * 2 + ("llama-65b",)
)
MUXSERVE_CLUSTER = Cluster(nnodes=4, ngpus_per_node=8)


def muxserve_synthetic(alpha: float = 0.9, scale: float = 1.0) -> WorkloadSpec:
    """MuxServe's synthetic workload: 19 LLMs on 4×8 GPUs, llm-0 at 40·scale req/s.

    The paper sweeps α ∈ {0.7, 0.9, 1.3, 1.7, 2.1} and scale 0.5–1.25.
    """
    rates = power_law_rates(len(MUXSERVE_SYNTHETIC_MODELS), alpha, top_rate=40.0 * scale)
    llms = tuple(
        ServedLLM(f"llm-{i}", mtype, float(r))
        for i, (mtype, r) in enumerate(zip(MUXSERVE_SYNTHETIC_MODELS, rates, strict=True))
    )
    return WorkloadSpec(
        llms, MUXSERVE_CLUSTER, label=f"muxserve-synthetic(alpha={alpha}, scale={scale})"
    )


def power_law_spec(
    model_types: list[str],
    alpha: float,
    *,
    top_rate: float | None = None,
    total_rate: float | None = None,
    cluster: Cluster | None = None,
) -> WorkloadSpec:
    """Any mix of model types (in popularity order) with power-law rates; LLMs named llm-0, llm-1, …"""
    rates = power_law_rates(len(model_types), alpha, top_rate=top_rate, total_rate=total_rate)
    llms = tuple(
        ServedLLM(f"llm-{i}", t, float(r))
        for i, (t, r) in enumerate(zip(model_types, rates, strict=True))
    )
    return WorkloadSpec(llms, cluster, label=f"power-law(alpha={alpha}, n={len(llms)})")


# Named set-ups for the CLI and configs: name -> builder taking (alpha, scale).
SETUPS: dict[str, Callable[[float, float], WorkloadSpec]] = {
    "muxserve-synthetic": muxserve_synthetic,
}


def setup(name: str, alpha: float = 0.9, scale: float = 1.0) -> WorkloadSpec:
    """A named set-up, e.g. setup("muxserve-synthetic", alpha=2.1, scale=0.5)."""
    try:
        builder = SETUPS[name]
    except KeyError:
        raise WorkloadError(
            f"unknown set-up {name!r} (known: {', '.join(sorted(SETUPS))})"
        ) from None
    return builder(alpha, scale)
