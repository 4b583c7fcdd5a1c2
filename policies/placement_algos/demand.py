"""What placement is asked to serve: one `Demand` per LLM, taken from a workload or a spec.

Placement needs rates and mean lengths per LLM before any request runs. They come from the
workload itself (the original hard-coded 161/337 tokens for every LLM, which misplaces any
workload with other lengths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.placement import PlacementError, blocks_for_tokens, blocks_per_chunk
from policies.specs import ModelSpec, SpecError, model_spec
from traces.schema import Workload
from traces.spec import WorkloadSpec


@dataclass(frozen=True)
class Demand:
    """One served LLM: its model shape, mean request rate (req/s) and mean token lengths."""

    name: str
    model: ModelSpec
    rate: float
    avg_prompt: float
    avg_output: float

    @property
    def decode_ctx(self) -> float:
        """Mean KV length over a request's decode steps: the prompt plus half the output."""
        return self.avg_prompt + self.avg_output / 2

    @property
    def request_blocks(self) -> int:
        """KV pool blocks one request holds at its end: the room a batch slot must reserve."""
        return blocks_for_tokens(math.ceil(self.avg_prompt + self.avg_output), blocks_per_chunk(self.model))

    @property
    def work(self) -> float:
        """Computation requirement (rate × model scale): the greedy's placement order."""
        return self.rate * self.model.params


def _spec(name: str, model_type: str, extra: dict[str, ModelSpec] | None) -> ModelSpec:
    try:
        return model_spec(model_type, extra)
    except SpecError as e:
        raise PlacementError(f"LLM {name!r}: {e}") from None


def demands_from_workload(workload: Workload, extra_specs: dict[str, ModelSpec] | None = None) -> list[Demand]:
    """Rates and mean lengths from the trace; the `model_type` column names each LLM's ModelSpec.

    Without that column each LLM name must itself be a model name (e.g. a trace of "llama-7b").
    """
    df = workload.df
    if "model_type" in df.columns:
        types = df.groupby("model", sort=False)["model_type"].unique()
        mixed = [m for m, t in types.items() if len(t) > 1]
        if mixed:
            raise PlacementError(f"LLM {mixed[0]!r}: several model types in the workload ({', '.join(types[mixed[0]])})")
        type_of = {m: str(t[0]) for m, t in types.items()}
    else:
        type_of = {m: m for m in workload.models}
    rates, lengths = workload.rates(), workload.mean_lengths()
    return [Demand(m, _spec(m, type_of[m], extra_specs), rates[m], *lengths[m]) for m in workload.models]


def demands_from_spec(spec: WorkloadSpec, avg_prompt: float, avg_output: float,
                      extra_specs: dict[str, ModelSpec] | None = None) -> list[Demand]:
    """A spec has rates but no requests yet, so the lengths are given (e.g. ShareGPT's 161/338)."""
    return [Demand(m.name, _spec(m.name, m.model_type, extra_specs), m.rate, avg_prompt, avg_output)
            for m in spec.llms]


def check_demands(demands: list[Demand]) -> None:
    """Fail on input no placer can use, before any search: one line naming the LLM."""
    if not demands:
        raise PlacementError("no LLMs to place")
    seen: set[str] = set()
    for d in demands:
        if d.name in seen:
            raise PlacementError(f"LLM {d.name!r} is listed twice")
        seen.add(d.name)
        if not (math.isfinite(d.rate) and d.rate >= 0):
            raise PlacementError(f"LLM {d.name!r}: rate must be a finite number ≥ 0 (got {d.rate})")
        if not (d.avg_prompt > 0 and d.avg_output > 0):
            raise PlacementError(f"LLM {d.name!r}: mean prompt and output lengths must be > 0 "
                                 f"(got {d.avg_prompt}, {d.avg_output})")
