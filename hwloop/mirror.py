"""What the simulator must know to model the CPU runner like for like: whole cores and core slices.

On CPU the runner gives a worker whole cores (`hwloop.partition`): its share of a unit is fixed
when it starts and rounded down to whole cores, and workers whose core sets overlap take turns.
The simulator knows neither cores nor processes, so this module states both in its terms:
- `CoreShareCost` wraps a cost model so that an SM share costs what its whole cores cost: 60% and
  90% of a 2-core unit both run on one core, and a profile's rows for one core count are the only
  ones that may be read (interpolating between core counts would invent a speed no worker has);
- `core_slices` gives each LLM the cores its worker will be pinned to, computed by the runner's
  own `cpu_slices`, for the simulator's `core_slices` option (turn-taking on shared cores).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hwloop.partition import (
    PartitionError,
    available_cores,
    cores_for_share,
    cpu_slices,
    split_cpu_slices,
)
from policies.cost import CostModel, CostModelError
from policies.placement import Placement
from policies.specs import ModelSpec


@dataclass(frozen=True)
class CoreShareCost:
    """`inner` (a profile measured on `profile_cores` cores) read at the whole cores a share gets.

    A share s of a unit of tp GPUs, each standing for `gpu_cores` cores, runs on
    k = cores_for_share(s, tp · gpu_cores) cores; the profiler measured k cores at
    sm_pct = 100 · k / profile_cores, which is the row read here.
    """

    inner: CostModel
    gpu_cores: int
    profile_cores: int

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def label(self) -> str:
        return f"{self.inner.label} (shares as whole cores of {self.gpu_cores}-core GPUs)"

    def pct(self, tp: int, sm_pct: int) -> int:
        """The profile's share for the cores this share runs on."""
        k = cores_for_share(sm_pct, tp * self.gpu_cores)
        if k > self.profile_cores:
            raise CostModelError(f"{self.inner.label}: a {sm_pct}% share of {tp * self.gpu_cores} cores runs on "
                                 f"{k} cores, but the profile was measured on {self.profile_cores}")
        return round(100 * k / self.profile_cores)

    def supports(self, model: ModelSpec, tp: int) -> bool:
        return self.inner.supports(model, tp)

    def prefill_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, seq_len: float) -> float:
        return self.inner.prefill_time(model, tp, self.pct(tp, sm_pct), batch, seq_len)

    def decode_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_len: float) -> float:
        return self.inner.decode_time(model, tp, self.pct(tp, sm_pct), batch, ctx_len)

    def decode_times(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_lens: np.ndarray) -> np.ndarray:
        return self.inner.decode_times(model, tp, self.pct(tp, sm_pct), batch, ctx_lens)

    def decode_curve(self, model: ModelSpec, tp: int, sm_pct: int, batch: int) -> Callable[[float], float]:
        return self.inner.decode_curve(model, tp, self.pct(tp, sm_pct), batch)


def profile_shares(ncores: int) -> tuple[int, ...]:
    """One share per core count (100 · k / ncores): all a profile for `CoreShareCost` needs."""
    return tuple(round(100 * k / ncores) for k in range(1, ncores + 1))


def gpu_core_table(gpus: Sequence[int], cores: Sequence[int] | None = None) -> dict[int, tuple[int, ...]]:
    """The cores standing for each GPU index: `cores` (default: this process's) split evenly, in order."""
    cores = tuple(cores or available_cores())
    if len(cores) < len(gpus):
        raise PartitionError(f"{len(gpus)} GPU indices need at least as many CPU cores, {len(cores)} available")
    per = len(cores) // len(gpus)
    return {g: cores[i * per:(i + 1) * per] for i, g in enumerate(sorted(gpus))}


def core_slices(placement: Placement, exclusive: bool, gpu_cores: dict[int, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """LLM name → the cores its worker is pinned to, exactly as `hwloop.runner.Runner` pins it."""
    out: dict[str, tuple[int, ...]] = {}
    for unit in placement.units:
        cores = [c for g in unit.gpus for c in gpu_cores[g]]
        for llm, sl in zip(unit.llms, cpu_slices(unit.llms, exclusive, cores), strict=True):
            out[llm.name] = sl.cores
    return out


def split_core_slices(placement: Placement, exclusive: bool,
                      gpu_cores: dict[int, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """"<LLM>/prefill" and "<LLM>/decode" → the cores each split-mode worker is pinned to, exactly as
    `hwloop.split_runner.SplitRunner` pins them (the simulator's per-phase `core_slices` keys)."""
    out: dict[str, tuple[int, ...]] = {}
    for unit in placement.units:
        cores = [c for g in unit.gpus for c in gpu_cores[g]]
        for llm, (pre, dec) in zip(unit.llms, split_cpu_slices(unit.llms, exclusive, cores), strict=True):
            out[f"{llm.name}/prefill"], out[f"{llm.name}/decode"] = pre.cores, dec.cores
    return out
