"""Beyond the paper: improve the greedy's placement under the same estimate.

Small instances are solved exactly by enumerating every assignment of LLMs to the meshes of every
mesh group. Larger ones use simulated annealing from the greedy's solution over four moves: move an
LLM to another mesh, swap two LLMs, merge two equal meshes of a node, split a mesh in halves (the
last two change the mesh group). The result is never worse than the greedy's: it is returned
unchanged unless the search finds a strictly better score.
"""

from __future__ import annotations

import math
import random
from itertools import product

from policies.cost import CostModel
from policies.placement import Placement
from policies.specs import ClusterSpec

from .demand import Demand, check_demands
from .estimate import Estimator, PlacerOptions
from .greedy import absorb_idle, solve_muxserve
from .meshes import (
    Mesh,
    Solution,
    empty_meshes,
    mesh_groups,
    score,
    size_multiset,
    to_placement,
    with_llm,
    without_llm,
)


def distinct_groups(est: Estimator) -> list[tuple[Mesh, ...]]:
    """One group per multiset of mesh sizes: the others are copies."""
    seen: dict[tuple[int, ...], tuple[Mesh, ...]] = {}
    for g in mesh_groups(est.cluster):
        seen.setdefault(size_multiset(g), empty_meshes(g))
    return list(seen.values())


def assignments(est: Estimator) -> int:
    """How many assignments brute force would try."""
    return sum(len(g) ** len(est.demands) for g in distinct_groups(est))


def brute_force(est: Estimator) -> Solution | None:
    """The optimum over every mesh group and assignment (each LLM at its candidate shares)."""
    best: Solution | None = None
    n = len(est.demands)
    for slots in distinct_groups(est):
        for assign in product(range(len(slots)), repeat=n):
            meshes = tuple(Mesh(m.node, m.size, tuple(i for i in range(n) if assign[i] == k))
                           for k, m in enumerate(slots))
            total = score(meshes, est)
            if total is not None and (best is None or total > best.score):
                best = Solution(meshes, total)
    return best


Move = tuple[tuple[int, ...], tuple[Mesh, ...]]  # meshes removed (indices), meshes added


def propose(meshes: list[Mesh], where: dict[int, int], rng: random.Random, gpn: int) -> Move | None:
    """A random neighbour, or None when the drawn kind of move has nothing to act on."""
    kind = rng.random()
    if kind < 0.4:  # move one LLM
        i = rng.choice(sorted(where))
        a, b = where[i], rng.randrange(len(meshes))
        if a == b:
            return None
        return (a, b), (without_llm(meshes[a], i), with_llm(meshes[b], i))
    if kind < 0.7:  # swap two LLMs
        if len(where) < 2:
            return None
        i, j = rng.sample(sorted(where), 2)
        a, b = where[i], where[j]
        if a == b:
            return None
        return (a, b), (with_llm(without_llm(meshes[a], i), j), with_llm(without_llm(meshes[b], j), i))
    a = rng.randrange(len(meshes))
    m = meshes[a]
    if kind < 0.85:  # merge two meshes of one size on one node
        partners = [b for b, x in enumerate(meshes) if b != a and (x.node, x.size) == (m.node, m.size)]
        if not partners or 2 * m.size > gpn:
            return None
        b = rng.choice(partners)
        return (a, b), (Mesh(m.node, 2 * m.size, tuple(sorted(m.llms + meshes[b].llms))),)
    if m.size == 1:  # split a mesh in halves, its LLMs drawn to either side
        return None
    side = [rng.random() < 0.5 for _ in m.llms]
    half = m.size // 2
    return (a,), (Mesh(m.node, half, tuple(i for i, s in zip(m.llms, side, strict=True) if s)),
                  Mesh(m.node, half, tuple(i for i, s in zip(m.llms, side, strict=True) if not s)))


def values_of(meshes: list[Mesh] | tuple[Mesh, ...], est: Estimator) -> list[float] | None:
    out = []
    for m in meshes:
        v = est.value(m.size, m.llms)
        if v is None:
            return None
        out.append(v)
    return out


def anneal(est: Estimator, start: tuple[Mesh, ...], rng: random.Random, iterations: int) -> Solution:
    """Simulated annealing on the total score, geometric cooling from 1% to 0.001% of the start."""
    meshes = list(start)
    values = values_of(meshes, est)
    assert values is not None, "annealing must start from a feasible placement"
    current = sum(values)
    best = Solution(tuple(meshes), current)
    t0 = 0.01 * max(current, 1e-9)
    cool = 1e-3 ** (1 / max(iterations, 1))
    where = {i: k for k, m in enumerate(meshes) for i in m.llms}
    temp = t0
    for _ in range(iterations):
        temp *= cool
        move = propose(meshes, where, rng, est.cluster.gpus_per_node)
        if move is None:
            continue
        removed, added = move
        new = values_of(added, est)
        if new is None:
            continue
        delta = sum(new) - sum(values[k] for k in removed)
        if delta < 0 and rng.random() >= math.exp(delta / temp):
            continue
        keep = [k for k in range(len(meshes)) if k not in removed]
        meshes = [meshes[k] for k in keep] + list(added)
        values = [values[k] for k in keep] + new
        current += delta
        where = {i: k for k, m in enumerate(meshes) for i in m.llms}
        if current > best.score:
            best = Solution(tuple(meshes), current)
    total = score(best.meshes, est)  # without the rounding that the running sum accumulated
    assert total is not None  # only feasible moves are taken
    return Solution(best.meshes, total)


def search(demands: list[Demand], cluster: ClusterSpec, cost: CostModel, opts: PlacerOptions) -> Placement:
    check_demands(demands)
    est = Estimator(demands, cluster, cost, opts)
    greedy, meta = solve_muxserve(est)
    space = assignments(est)
    if space <= opts.brute_force_limit:
        found, method = brute_force(est), "brute force"
    else:
        found, method = anneal(est, greedy.meshes, random.Random(opts.seed), opts.iterations), "annealing"
    improved = found is not None and found.score > greedy.score + 1e-9 * abs(greedy.score)  # not a rounding tie
    meshes = absorb_idle(found.meshes, est) if found is not None and improved else greedy.meshes
    meta |= {"method": method, "assignments": space, "greedy_estimate": est.throughput(greedy.score),
             "improved": improved}
    return to_placement("search", meshes, est, lambda m: est.members(m.size, m.llms), meta=meta)
