"""Placement policies: which LLMs share which GPUs, at what SM shares (MuxServe and baselines).

    make_placement(name, demands, cluster, cost, **opts) -> Placement

Names: "muxserve" (the paper's enumeration-based greedy), "spatial" (dedicated GPUs per LLM),
"temporal" (muxserve's colocation, one job at a time), "search" (improves the greedy's estimate).
`opts` are fields of `PlacerOptions`. Input that cannot be placed fails with a one-line
PlacementError naming the LLM and the shortfall, before any search.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

from policies.cost import CostModel
from policies.placement import Placement, PlacementError
from policies.specs import ClusterSpec

from .demand import Demand, check_demands, demands_from_spec, demands_from_workload
from .estimate import Candidate, Estimator, MeshEstimate, PlacerOptions
from .greedy import muxserve, temporal
from .meshes import check_placement, mesh_groups, node_partitions
from .search import search
from .spatial import spatial

Placer = Callable[[list[Demand], ClusterSpec, CostModel, PlacerOptions], Placement]
PLACERS: dict[str, Placer] = {"muxserve": muxserve, "spatial": spatial, "temporal": temporal, "search": search}


def make_placement(name: str, demands: Iterable[Demand], cluster: ClusterSpec, cost: CostModel,
                   **opts: object) -> Placement:
    """Run placer `name`; the result's meta records the wall time it took (`time_s`)."""
    if name not in PLACERS:
        raise PlacementError(f"unknown placement policy {name!r}; known: {', '.join(PLACERS)}")
    known = {f.name for f in dataclasses.fields(PlacerOptions)}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise PlacementError(f"unknown placement option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        options = PlacerOptions(**opts)  # type: ignore[arg-type]
    except ValueError as e:
        raise PlacementError(str(e)) from None
    t0 = time.perf_counter()
    placement = PLACERS[name](list(demands), cluster, cost, options)
    return dataclasses.replace(placement, meta={**placement.meta, "time_s": round(time.perf_counter() - t0, 4)})


__all__ = [
    "PLACERS",
    "Candidate",
    "Demand",
    "Estimator",
    "MeshEstimate",
    "PlacerOptions",
    "check_demands",
    "check_placement",
    "demands_from_spec",
    "demands_from_workload",
    "make_placement",
    "mesh_groups",
    "node_partitions",
]
