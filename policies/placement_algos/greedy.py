"""MuxServe's enumeration-based greedy placement (paper Alg. 1 and 2), and the temporal baseline.

For every mesh group, LLMs are placed largest computation requirement first, each on the mesh
where it raises the estimate most. Fixed here, against the public code: the gain is looked up for
the mesh it was computed for, lengths come from the workload, idle GPUs join busy meshes, and the
search is fast (memoised estimates, duplicate groups dropped, groups that cannot win skipped).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from policies.cost import CostModel
from policies.placement import BLOCK_BYTES, Placement, PlacementError
from policies.specs import ClusterSpec

from .demand import Demand, check_demands
from .estimate import Estimator, PlacerOptions
from .meshes import (
    Mesh,
    Solution,
    empty_meshes,
    idle_gpus,
    mesh_groups,
    score,
    size_multiset,
    to_placement,
    with_llm,
)

GiB = 2**30


def check_feasible(est: Estimator) -> None:
    """Fail before any search when an LLM fits no mesh or the cluster's memory is short."""
    c = est.cluster
    per_gpu = c.gpu.memory_bytes - c.reserve_bytes_per_gpu
    need = [d.model.weight_bytes + d.request_blocks * BLOCK_BYTES for d in est.demands]
    for d, cands, n in zip(est.demands, est.candidates, need, strict=True):
        if cands:
            continue
        have = c.gpus_per_node * per_gpu
        if n > have:
            raise PlacementError(
                f"LLM {d.name!r} ({d.model.name}): needs {n / GiB:.1f} GiB for weights and one request's KV, "
                f"but the largest mesh ({c.gpus_per_node} GPUs, one node) holds {have / GiB:.1f} GiB "
                f"after reserves (short by {(n - have) / GiB:.1f} GiB)")
        raise PlacementError(f"LLM {d.name!r} ({d.model.name}): cost model '{est.cost.label}' has no "
                             f"latencies for it on any mesh of ≤ {c.gpus_per_node} GPUs")
    total, have = sum(need), c.num_gpus * per_gpu
    if total > have:
        big = max(range(len(need)), key=need.__getitem__)
        raise PlacementError(
            f"the {len(need)} LLMs need {total / GiB:.1f} GiB for weights and one request's KV each, "
            f"but the {c.num_gpus} GPUs hold {have / GiB:.1f} GiB after reserves "
            f"(short by {(total - have) / GiB:.1f} GiB; largest: {est.demands[big].name!r}, "
            f"{est.demands[big].model.name}, {need[big] / GiB:.1f} GiB)")


def greedy_order(est: Estimator) -> list[int]:
    """Largest computation requirement (rate × parameters) first, ties in input order."""
    return sorted(range(len(est.demands)), key=lambda i: (-est.demands[i].work, i))


def greedy_fill(est: Estimator, meshes: tuple[Mesh, ...], order: list[int]) -> Solution | int:
    """Place LLMs one by one on the mesh with the largest gain; the LLM that found none on failure.

    Equal gains (common once rates are met) go to the emptier mesh, which spreads load, then to
    the smaller one, which keeps large meshes for large models (MuxServe's rule), then the first.
    Meshes in the same state (e.g. all empty 1-GPU meshes) give the same gain and are evaluated
    once.
    """
    meshes = list(meshes)
    terms: list[tuple[float, ...]] = [()] * len(meshes)
    for i in order:
        best: tuple[tuple[float, int, int], int, tuple[float, ...]] | None = None  # key, mesh, terms
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for k, m in enumerate(meshes):
            if (m.size, m.llms) in seen:
                continue
            seen.add((m.size, m.llms))
            new = est.terms(m.size, with_llm(m, i).llms)
            if new is None:
                continue
            key = (math.fsum((*new, *(-t for t in terms[k]))), -len(m.llms), -m.size)
            if best is None or key > best[0]:
                best = (key, k, new)
        if best is None:
            return i
        _, k, new = best
        meshes[k], terms[k] = with_llm(meshes[k], i), new
    return Solution(tuple(meshes), math.fsum(t for ts in terms for t in ts))


@dataclass(frozen=True)
class GroupSearch:
    solution: Solution
    groups_total: int
    groups_evaluated: int


def best_group(est: Estimator) -> GroupSearch:
    """The best greedy fill over all mesh groups (Alg. 2).

    Best means the highest score, then the fewest idle GPUs (ties are common once every rate is
    met), then the first group in enumeration order. With `prune`, groups with the same multiset
    of mesh sizes are filled once (meshes are independent, so the results are the same), and
    groups are visited by decreasing upper bound, stopping when no remaining group can win. Both
    keep the unpruned answer.
    """
    groups = mesh_groups(est.cluster)
    order = greedy_order(est)
    visit: list[tuple[float, int]]
    if est.opts.prune:
        first: dict[tuple[int, ...], int] = {}
        for idx, g in enumerate(groups):
            first.setdefault(size_multiset(g), idx)
        bounds = {idx: math.fsum(est.upper_bound(i, set(sizes)) for i in range(len(est.demands)))
                  for sizes, idx in first.items()}
        visit = sorted(((b, idx) for idx, b in bounds.items() if b > float("-inf")), key=lambda t: (-t[0], t[1]))
    else:
        visit = [(math.inf, idx) for idx in range(len(groups))]
    best: tuple[tuple[float, int, int], Solution] | None = None  # (score, -idle, -index), solution
    stuck: tuple[int, int] | None = None  # (LLMs placed, LLM that found no mesh) of the furthest failure
    evaluated = 0
    for bound, idx in visit:
        if best is not None and (bound, 0, -idx) < best[0]:
            break  # visited by decreasing bound, then index: no later group can win either
        evaluated += 1
        res = greedy_fill(est, empty_meshes(groups[idx]), order)
        if isinstance(res, int):
            placed = order.index(res)
            if stuck is None or placed > stuck[0]:
                stuck = (placed, res)
            continue
        key = (res.score, -idle_gpus(res.meshes, est.cluster), -idx)
        if best is None or key > best[0]:
            best = (key, res)
    if best is None:
        if stuck is None:
            raise PlacementError("no mesh group offers every LLM a mesh size it fits")
        d = est.demands[stuck[1]]
        raise PlacementError(
            f"LLM {d.name!r} ({d.model.name}): the greedy found no mesh with room for it in any mesh group "
            f"(memory or the {est.opts.sm_budget}% decode SM budget; at best {stuck[0]} LLMs were placed before it)")
    return GroupSearch(best[1], len(groups), evaluated)


def absorb_idle(meshes: tuple[Mesh, ...], est: Estimator) -> tuple[Mesh, ...]:
    """Idle GPUs join a busy mesh of the same size on their node when the estimate does not drop.

    The public code left them idle. Two idle meshes pair up first when a busy mesh of twice their
    size could then take them. Every merge removes a mesh, so this ends.
    """
    meshes, gpn = list(meshes), est.cluster.gpus_per_node

    def may_double(m: Mesh) -> bool:
        if not m.llms:
            return any(x.llms and x.node == m.node and x.size == 2 * m.size for x in meshes)
        new, old = est.value(2 * m.size, m.llms), est.value(m.size, m.llms)
        return new is not None and old is not None and new >= old

    def merge_once() -> bool:
        for a, m in enumerate(meshes):
            for b, e in enumerate(meshes):
                if a != b and not e.llms and (m.node, m.size) == (e.node, e.size) and 2 * m.size <= gpn \
                        and may_double(m):
                    meshes[:] = [x for k, x in enumerate(meshes) if k not in (a, b)] + [Mesh(m.node, 2 * m.size, m.llms)]
                    return True
        return False

    while merge_once():
        pass
    return tuple(meshes)


def solve_muxserve(est: Estimator) -> tuple[Solution, dict]:
    """The greedy's solution (idle GPUs absorbed) and how the search went."""
    check_feasible(est)
    t0 = time.perf_counter()
    found = best_group(est)
    meshes = absorb_idle(found.solution.meshes, est)
    total = score(meshes, est)
    assert total is not None  # absorb_idle only accepts feasible merges
    meta = {"groups_total": found.groups_total, "groups_evaluated": found.groups_evaluated,
            "search_s": round(time.perf_counter() - t0, 4)}
    return Solution(meshes, total), meta


def muxserve(demands: list[Demand], cluster: ClusterSpec, cost: CostModel, opts: PlacerOptions) -> Placement:
    check_demands(demands)
    est = Estimator(demands, cluster, cost, opts)
    sol, meta = solve_muxserve(est)
    return to_placement("muxserve", sol.meshes, est, lambda m: est.members(m.size, m.llms), meta=meta)


def temporal(demands: list[Demand], cluster: ClusterSpec, cost: CostModel, opts: PlacerOptions) -> Placement:
    """MuxServe's colocation without SM splitting: every job gets the whole mesh, one at a time."""
    check_demands(demands)
    est = Estimator(demands, cluster, cost, opts)
    sol, meta = solve_muxserve(est)
    return to_placement("temporal", sol.meshes, est, lambda m: tuple((i, 100, 100) for i in m.llms),
                        exclusive=True, meta=meta)
