"""Spatial partitioning, the paper's first baseline: every LLM on its own GPUs, no sharing.

How many GPUs each LLM gets is a rule (`PlacerOptions.spatial_rule`):
- "paper": MuxServe's synthetic set-up, 7B and 13B on 1 GPU, 30B on 4, 65B on 8. It needs 46 GPUs
  for the ChatLMSYS set (4×7B, 6×13B, 3×30B, 3×65B), more than the paper's 32.
- "fit": per LLM, the fewest GPUs that meet its rate (else its best-throughput size).
- "fit-cluster": every LLM on its smallest mesh that fits in memory; then spare GPUs go, one mesh
  size up at a time, to the LLM with the highest load (rate × parameters) per GPU, among those
  whose estimated served rate the bigger mesh raises, until the cluster is full or no step helps.
  A spatial baseline for any cluster that holds the LLMs at all.
`spatial_gpus` sets the count of named LLMs outright, whatever the rule.
"""

from __future__ import annotations

from policies.cost import CostModel
from policies.placement import Placement, PlacementError
from policies.specs import ClusterSpec

from .demand import Demand, check_demands
from .estimate import SPATIAL_RULES, Estimator, PlacerOptions, power_sizes
from .greedy import check_feasible
from .meshes import Mesh, to_placement

# The paper's synthetic set-up: 7B and 13B on 1 GPU, 30B on 4, 65B on 8 (by parameters: below
# 20B → 1, below 40B → 4, else 8).
PAPER_GPUS: tuple[tuple[float, int], ...] = ((20e9, 1), (40e9, 4))


def _tpt(est: Estimator, i: int, n: int) -> float | None:
    e = est.mesh(n, ((i, 100, 100),))
    return None if e is None else e.tpt[0]


def _alone(est: Estimator, i: int) -> dict[int, float]:
    """Mesh size → LLM i's estimated throughput alone on it, for the sizes it fits (ascending)."""
    d = est.demands[i]
    return {n: t for n in power_sizes(est.cluster.gpus_per_node)
            if est.cost.supports(d.model, n) and (t := _tpt(est, i, n)) is not None}


def mesh_size(est: Estimator, i: int, rule: str | None = None) -> int:
    """GPUs for LLM i alone under a per-LLM rule: "paper" (its count, or the next size that fits)
    or "fit" (the fewest meeting its rate, else the best-throughput size); default est's rule."""
    d, tpts = est.demands[i], _alone(est, i)
    if (rule or est.opts.spatial_rule) == "fit":
        return next((n for n, t in tpts.items() if t >= d.rate), max(tpts, key=lambda n: (tpts[n], -n)))
    wanted = next((g for below, g in PAPER_GPUS if d.model.params < below), 8)
    return min((n for n in tpts if n >= wanted), default=max(tpts))


def fit_cluster(est: Estimator, fixed: dict[int, int]) -> list[int]:
    """The "fit-cluster" sizes (module doc); LLMs in `fixed` keep their given count."""
    alone = [_alone(est, i) for i in range(len(est.demands))]
    sizes = [fixed.get(i, min(alone[i])) for i in range(len(est.demands))]
    spare = est.cluster.num_gpus - sum(sizes)

    def served(i: int, n: int) -> float:
        return min(alone[i][n], est.demands[i].rate)

    while spare > 0:
        grow = [i for i, n in enumerate(sizes) if i not in fixed and 2 * n in alone[i] and n <= spare
                and served(i, 2 * n) > served(i, n) * (1 + 1e-9)]
        if not grow:
            break
        i = max(grow, key=lambda i: (est.demands[i].work / sizes[i], -i))
        spare -= sizes[i]
        sizes[i] *= 2
    return sizes


def rule_sizes(est: Estimator, rule: str) -> list[int]:
    """Each LLM's GPUs under `rule`, with the explicit counts of `spatial_gpus` applied."""
    index = {d.name: i for i, d in enumerate(est.demands)}
    fixed = {}
    for name, n in est.opts.spatial_gpus:
        if name not in index:
            raise PlacementError(f"spatial_gpus: no LLM named {name!r} (LLMs: {', '.join(index)})")
        if n not in _alone(est, index[name]):
            raise PlacementError(f"spatial_gpus: LLM {name!r} ({est.demands[index[name]].model.name}) cannot run "
                                 f"on {n} GPU(s): it fits on {', '.join(map(str, _alone(est, index[name])))}")
        fixed[index[name]] = n
    if rule == "fit-cluster":
        return fit_cluster(est, fixed)
    return [fixed.get(i, mesh_size(est, i, rule)) for i in range(len(est.demands))]


def _fits(sizes: list[int], cluster: ClusterSpec) -> bool:
    """Power-of-two meshes no bigger than a node pack first-fit-decreasing exactly when they sum to
    at most the cluster, so the count decides."""
    return sum(sizes) <= cluster.num_gpus


def _too_small(est: Estimator, sizes: list[int]) -> PlacementError:
    """One line: what the chosen rule needs, and which rule would fit this cluster."""
    rule, have = est.opts.spatial_rule, est.cluster.num_gpus
    others = [r for r in SPATIAL_RULES if r != rule and _fits(rule_sizes(est, r), est.cluster)]
    hint = (f"rule {others[0]!r} fits: spatial.rule={others[0]}" if others else
            f"no rule fits: even the smallest meshes need {sum(rule_sizes(est, 'fit-cluster'))} GPUs")
    return PlacementError(f"spatial: rule {rule!r} needs {sum(sizes)} GPUs for the {len(sizes)} LLMs, the cluster "
                          f"has {have} (short by {sum(sizes) - have}; {hint})")


def pack(est: Estimator, sizes: list[int]) -> tuple[Mesh, ...]:
    """First fit, largest first: with power-of-two sizes this fills nodes without gaps or misalignment."""
    if not _fits(sizes, est.cluster):
        raise _too_small(est, sizes)
    gpn, used = est.cluster.gpus_per_node, [0] * est.cluster.nnodes
    meshes = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        node = next(k for k, u in enumerate(used) if u + sizes[i] <= gpn)
        used[node] += sizes[i]
        meshes.append(Mesh(node, sizes[i], (i,)))
    return tuple(meshes)


def spatial(demands: list[Demand], cluster: ClusterSpec, cost: CostModel, opts: PlacerOptions) -> Placement:
    check_demands(demands)
    est = Estimator(demands, cluster, cost, opts)
    check_feasible(est)
    meshes = pack(est, rule_sizes(est, opts.spatial_rule))
    return to_placement("spatial", meshes, est, lambda m: ((m.llms[0], 100, 100),),
                        meta={"spatial_rule": opts.spatial_rule})
