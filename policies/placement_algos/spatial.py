"""Spatial partitioning, the paper's first baseline: every LLM on its own GPUs, no sharing."""

from __future__ import annotations

from policies.cost import CostModel
from policies.placement import Placement, PlacementError
from policies.specs import ClusterSpec

from .demand import Demand, check_demands
from .estimate import Estimator, PlacerOptions, power_sizes
from .greedy import check_feasible
from .meshes import Mesh, to_placement

# The paper's synthetic set-up: 7B and 13B on 1 GPU, 30B on 4, 65B on 8 (by parameters: below
# 20B → 1, below 40B → 4, else 8).
PAPER_GPUS: tuple[tuple[float, int], ...] = ((20e9, 1), (40e9, 4))


def _tpt(est: Estimator, i: int, n: int) -> float | None:
    e = est.mesh(n, ((i, 100, 100),))
    return None if e is None else e.tpt[0]


def mesh_size(est: Estimator, i: int) -> int:
    """GPUs for LLM i: the paper's count (or the next size that fits), or with rule "fit" the
    fewest that meet its rate (else the best-throughput size)."""
    d = est.demands[i]
    tpts = {n: t for n in power_sizes(est.cluster.gpus_per_node)
            if est.cost.supports(d.model, n) and (t := _tpt(est, i, n)) is not None}
    if est.opts.spatial_rule == "fit":
        return next((n for n, t in tpts.items() if t >= d.rate), max(tpts, key=lambda n: (tpts[n], -n)))
    wanted = next((g for below, g in PAPER_GPUS if d.model.params < below), 8)
    return min((n for n in tpts if n >= wanted), default=max(tpts))


def pack(est: Estimator, sizes: list[int]) -> tuple[Mesh, ...]:
    """First fit, largest first: with power-of-two sizes this fills nodes without gaps or misalignment."""
    gpn, used = est.cluster.gpus_per_node, [0] * est.cluster.nnodes
    meshes = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        node = next((k for k, u in enumerate(used) if u + sizes[i] <= gpn), None)
        if node is None:
            d, need, have = est.demands[i], sum(sizes), est.cluster.num_gpus
            why = f"short by {need - have}" if need > have else f"no node has {sizes[i]} free"
            raise PlacementError(f"spatial: no room for LLM {d.name!r} ({d.model.name}) on {sizes[i]} GPU(s): "
                                 f"the {len(sizes)} LLMs need {need} GPUs, the cluster has {have} ({why})")
        used[node] += sizes[i]
        meshes.append(Mesh(node, sizes[i], (i,)))
    return tuple(meshes)


def spatial(demands: list[Demand], cluster: ClusterSpec, cost: CostModel, opts: PlacerOptions) -> Placement:
    check_demands(demands)
    est = Estimator(demands, cluster, cost, opts)
    check_feasible(est)
    meshes = pack(est, [mesh_size(est, i) for i in range(len(demands))])
    return to_placement("spatial", meshes, est, lambda m: ((m.llms[0], 100, 100),),
                        meta={"spatial_rule": opts.spatial_rule})
