"""Meshes and mesh groups, and how a solution becomes a `Placement`.

A solution is a set of meshes, each on one node; a mesh group is the cut of every node into
meshes. Meshes never span nodes, and sizes are powers of two so each can run tensor parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import combinations_with_replacement

from policies.placement import (
    SM_UNITS_FULL,
    LLMPlacement,
    Placement,
    PlacementError,
    Unit,
    check_unit_fits,
)
from policies.specs import ClusterSpec, ModelSpec

from .estimate import Estimator, Member, power_sizes


@dataclass(frozen=True)
class Mesh:
    node: int
    size: int
    llms: tuple[int, ...] = ()  # LLM indices, sorted


def with_llm(mesh: Mesh, i: int) -> Mesh:
    return replace(mesh, llms=tuple(sorted((*mesh.llms, i))))


def without_llm(mesh: Mesh, i: int) -> Mesh:
    return replace(mesh, llms=tuple(x for x in mesh.llms if x != i))


@dataclass(frozen=True)
class Solution:
    meshes: tuple[Mesh, ...]
    score: float  # Σ over meshes of Estimator.value


def node_partitions(gpus: int) -> list[tuple[int, ...]]:
    """Every way to cut one node into power-of-two meshes, largest mesh first.

    For 8 GPUs these are the paper's ten, in its order: [8] [4,4] [4,2,2] … [1×8].
    """

    def cuts(left: int, largest: int) -> list[tuple[int, ...]]:
        if left == 0:
            return [()]
        return [(s, *rest) for s in reversed(power_sizes(min(left, largest))) for rest in cuts(left - s, s)]

    return cuts(gpus, gpus)


def mesh_groups(cluster: ClusterSpec) -> list[tuple[tuple[int, ...], ...]]:
    """Node partitions combined across nodes as multisets (nodes are alike): 715 for 4 × 8 GPUs."""
    return list(combinations_with_replacement(node_partitions(cluster.gpus_per_node), cluster.nnodes))


def size_multiset(group: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """What a group's result depends on: meshes are independent, so not which node holds which."""
    return tuple(sorted(s for cut in group for s in cut))


def empty_meshes(group: tuple[tuple[int, ...], ...]) -> tuple[Mesh, ...]:
    return tuple(Mesh(node, size) for node, cut in enumerate(group) for size in cut)


def score(meshes: tuple[Mesh, ...] | list[Mesh], est: Estimator) -> float | None:
    """Total of the meshes' score terms (exactly rounded, so order does not matter); None if infeasible."""
    terms = []
    for m in meshes:
        t = est.terms(m.size, m.llms)
        if t is None:
            return None
        terms.extend(t)
    return math.fsum(terms)


def idle_gpus(meshes: tuple[Mesh, ...] | list[Mesh], cluster: ClusterSpec) -> int:
    return cluster.num_gpus - sum(m.size for m in meshes if m.llms)


def to_placement(policy: str, meshes: tuple[Mesh, ...], est: Estimator,
                 shares: Callable[[Mesh], tuple[Member, ...]], exclusive: bool = False,
                 meta: dict | None = None) -> Placement:
    """Units for the non-empty meshes, GPUs numbered within each node, largest mesh first.

    Powers of two laid out largest first are always aligned, so a mesh of n GPUs starts at a
    multiple of n (the NVLink-friendly position). Idle GPUs are counted in `meta`.
    """
    units, per_llm, served, terms = [], {}, [], []
    for node in sorted({m.node for m in meshes}):
        offset = 0
        for m in sorted((m for m in meshes if m.node == node), key=lambda m: -m.size):
            gpus, offset = tuple(range(offset, offset + m.size)), offset + m.size
            if not m.llms:
                continue
            members = shares(m)
            e = est.mesh(m.size, members, exclusive)
            if e is None:
                raise PlacementError(f"mesh of {m.size} GPU(s) on node {node}: LLMs do not fit in memory")
            llms = []
            for (i, psm, dsm), batch, cap, tpt in zip(members, e.batch, e.cap, e.tpt, strict=True):
                d = est.demands[i]
                ceiling = est.batch_ceiling(i, m.size, e.kv_blocks)
                llms.append(LLMPlacement(d.name, d.model.name, m.size, psm, dsm, ceiling, 0, d.rate,
                                         d.avg_prompt, d.avg_output))
                per_llm[d.name] = {"est_batch": batch, "est_cap": cap, "est_tpt": round(float(tpt), 6)}
                served.append(min(tpt, d.rate))
                terms.append(d.rate * min(tpt, d.rate))
            units.append(Unit(len(units), node, gpus, tuple(llms), e.kv_blocks, est.opts.overload_units))
    total = est.total_rate
    return Placement(
        policy=policy,
        units=tuple(units),
        cost_model=est.cost.label,
        estimated_throughput=est.throughput(math.fsum(terms)),
        meta={"exclusive": exclusive, "served_rate": round(math.fsum(served), 6), "total_rate": round(float(total), 6),
              "idle_gpus": idle_gpus(meshes, est.cluster), "llms": per_llm, **(meta or {})},
    )


def check_placement(placement: Placement, cluster: ClusterSpec, specs: dict[str, ModelSpec]) -> None:
    """Raise PlacementError unless every unit fits (check_unit_fits) and GPUs are used at most once.

    A temporal placement (meta "exclusive") runs one job at a time, so its 100% shares never add
    up: its concurrent SM budget is that of a single job.
    """
    taken: set[tuple[int, int]] = set()
    names = [x.name for u in placement.units for x in u.llms]
    if len(set(names)) != len(names):
        raise PlacementError(f"LLM {next(n for n in names if names.count(n) > 1)!r} is placed more than once")
    for u in placement.units:
        if not 0 <= u.node < cluster.nnodes or any(not 0 <= g < cluster.gpus_per_node for g in u.gpus):
            raise PlacementError(f"unit {u.unit_id}: node {u.node} GPUs {u.gpus} outside the {cluster.nnodes}×{cluster.gpus_per_node} cluster")
        clash = taken & {(u.node, g) for g in u.gpus}
        if clash:
            raise PlacementError(f"unit {u.unit_id}: GPU {sorted(clash)[0]} already used by another unit")
        taken |= {(u.node, g) for g in u.gpus}
        if placement.meta.get("exclusive"):
            u = replace(u, sm_overload_units=u.sm_overload_units + SM_UNITS_FULL * (len(u.llms) - 1))
        check_unit_fits(u, cluster, specs)
