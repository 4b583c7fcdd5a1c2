"""The Placement: which LLMs share which GPUs, with what SM shares, batch caps and KV quotas.

It is plain data, saved as YAML, so one placement computed by any policy can be replayed by the
simulator and by the hardware runner, and compared like for like.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from policies.specs import ClusterSpec, ModelSpec

# One KV block is one layer × one KV head × BLOCK_TOKENS tokens of K and V, with a 128-wide head in
# 16-bit: LLMs of different shapes then draw from one pool in the same currency (MuxServe §4.3).
BLOCK_TOKENS = 32
BLOCK_BYTES = 2 * BLOCK_TOKENS * 128 * 2
SM_UNIT_PCT = 10  # an SM unit is 10% of a GPU's SMs (an MPS thread-percentage step)
SM_UNITS_FULL = 100 // SM_UNIT_PCT


class PlacementError(ValueError):
    """A placement that cannot run (does not fit, bad shares); the message names LLM and shortfall."""


def blocks_per_chunk(model: ModelSpec) -> int:
    """Pool blocks one request of `model` holds per BLOCK_TOKENS tokens of context."""
    return max(1, math.ceil(model.kv_bytes_per_token * BLOCK_TOKENS / BLOCK_BYTES))


def blocks_for_tokens(tokens: int, chunk_blocks: int) -> int:
    return -(-tokens // BLOCK_TOKENS) * chunk_blocks


@dataclass(frozen=True)
class LLMPlacement:
    """One served LLM on a unit. SM shares are percentages of the unit's SMs (MPS style)."""

    name: str
    model: str
    tp: int
    prefill_sm: int
    decode_sm: int
    max_batch: int
    kv_quota: int = 0  # blocks; 0 means "the policy decides" (e.g. ADBS sets it ∝ rate)
    rate: float = 0.0  # expected req/s, used for quotas and rate-weighted metrics
    avg_prompt: float = 0.0
    avg_output: float = 0.0

    @property
    def prefill_units(self) -> int:
        return -(-self.prefill_sm // SM_UNIT_PCT)

    @property
    def decode_units(self) -> int:
        return -(-self.decode_sm // SM_UNIT_PCT)


@dataclass(frozen=True)
class Unit:
    """A mesh of GPUs inside one node, the LLMs colocated on it, and its shared KV pool."""

    unit_id: int
    node: int
    gpus: tuple[int, ...]
    llms: tuple[LLMPlacement, ...]
    kv_blocks: int
    sm_overload_units: int = 2  # MuxServe lets decode shares sum to 120%

    @property
    def mesh_size(self) -> int:
        return len(self.gpus)

    @property
    def sm_units(self) -> int:
        return SM_UNITS_FULL + self.sm_overload_units


@dataclass(frozen=True)
class Placement:
    policy: str
    units: tuple[Unit, ...]
    cost_model: str = ""
    estimated_throughput: float = 0.0  # req/s, rate-weighted, from the cost model (an estimate)
    meta: dict[str, Any] = field(default_factory=dict)

    def unit_of(self) -> dict[str, int]:
        """LLM name → unit id."""
        return {llm.name: u.unit_id for u in self.units for llm in u.llms}

    def llm(self, name: str) -> LLMPlacement:
        for u in self.units:
            for llm in u.llms:
                if llm.name == name:
                    return llm
        raise PlacementError(f"LLM {name!r} is not placed on any unit")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["units"] = [
            {**asdict(u), "gpus": list(u.gpus), "llms": [asdict(x) for x in u.llms]} for u in self.units
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<placement>") -> Placement:
        try:
            units = tuple(
                Unit(
                    unit_id=int(u["unit_id"]),
                    node=int(u["node"]),
                    gpus=tuple(int(g) for g in u["gpus"]),
                    llms=tuple(LLMPlacement(**x) for x in u["llms"]),
                    kv_blocks=int(u["kv_blocks"]),
                    sm_overload_units=int(u.get("sm_overload_units", 2)),
                )
                for u in d["units"]
            )
        except KeyError as e:
            raise PlacementError(f"{source}: field {e.args[0]} missing") from None
        except TypeError as e:
            raise PlacementError(f"{source}: {e}") from None
        return cls(
            policy=str(d.get("policy", "")),
            units=units,
            cost_model=str(d.get("cost_model", "")),
            estimated_throughput=float(d.get("estimated_throughput", 0.0)),
            meta=dict(d.get("meta") or {}),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise PlacementError(f"{path}: placement file not found") from None
        return cls.from_dict(d, source=str(path))


def kv_pool_blocks(cluster: ClusterSpec, mesh_size: int, models: list[ModelSpec]) -> int:
    """Blocks left for KV after every colocated LLM's weights (sharded over the mesh) and reserves.

    Negative means the LLMs do not fit: callers turn that into a PlacementError naming the shortfall.
    """
    free = mesh_size * (cluster.gpu.memory_bytes - cluster.reserve_bytes_per_gpu)
    free -= sum(m.weight_bytes for m in models)
    return free // BLOCK_BYTES


def check_unit_fits(unit: Unit, cluster: ClusterSpec, specs: dict[str, ModelSpec]) -> None:
    """Raise PlacementError if the unit's weights overflow its memory or its decode shares its SMs."""
    models = [specs[x.model] for x in unit.llms]
    blocks = kv_pool_blocks(cluster, unit.mesh_size, models)
    if blocks <= 0:
        need = sum(m.weight_bytes for m in models) / 2**30
        have = unit.mesh_size * (cluster.gpu.memory_bytes - cluster.reserve_bytes_per_gpu) / 2**30
        names = ", ".join(x.name for x in unit.llms)
        raise PlacementError(
            f"unit {unit.unit_id} ({names}): weights need {need:.1f} GiB but {unit.mesh_size} GPU(s) "
            f"hold {have:.1f} GiB after reserves (short by {need - have:.1f} GiB)"
        )
    decode = sum(x.decode_sm for x in unit.llms)
    if decode > 100 + unit.sm_overload_units * SM_UNIT_PCT:
        raise PlacementError(
            f"unit {unit.unit_id}: decode SM shares sum to {decode}% > "
            f"{100 + unit.sm_overload_units * SM_UNIT_PCT}% budget"
        )
    for x in unit.llms:
        for what, share in (("prefill_sm", x.prefill_sm), ("decode_sm", x.decode_sm)):
            if not SM_UNIT_PCT <= share <= 100:
                raise PlacementError(f"LLM {x.name}: {what}={share} must be within {SM_UNIT_PCT}..100")
        if x.tp != unit.mesh_size:
            raise PlacementError(f"LLM {x.name}: tp={x.tp} differs from its mesh size {unit.mesh_size}")
