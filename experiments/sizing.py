"""Runs sized as MuxServe's benchmarks sized them (shared/reference/muxserve.md, Workloads).

MuxServe's synthetic benchmark gives each LLM `int(expected_tpt × 240 s × 1.1)` requests arriving
at its rate, where `expected_tpt` is the throughput MuxServe's placement estimates for it. An LLM
whose rate exceeds what its placement serves therefore gets a short burst, not minutes of overload.
`workload.sizing=paper` does the same here; `workload.sizing=duration` (the default) gives every LLM
`duration_s` of arrivals instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.cost import CostModel
from policies.placement_algos import demands_from_spec, make_placement
from policies.specs import ClusterSpec
from traces.lengths import MUXSERVE_LIMITS, SHAREGPT_FIT, LengthLimits, LengthSampler
from traces.spec import WorkloadSpec

BENCH_S = 240.0   # MuxServe's bench_end_to_end_muxserve.py: seconds of expected throughput …
MARGIN = 1.1      # … times this margin


def mean_lengths(lengths: LengthSampler, limits: LengthLimits, n: int = 200_000) -> tuple[float, float]:
    """The generator's mean prompt and output lengths after clipping (one fixed sample)."""
    prompt, output, _ = limits.clip(*lengths.sample(np.random.default_rng(0), n))
    return float(prompt.mean()), float(output.mean())


def paper_counts(spec: WorkloadSpec, cluster: ClusterSpec, cost: CostModel, placement_opts: dict[str, Any],
                 lengths: LengthSampler = SHAREGPT_FIT, limits: LengthLimits = MUXSERVE_LIMITS) -> dict[str, int]:
    """Requests per LLM: int(min(estimated throughput, rate) × 240 s × 1.1), from the muxserve
    placement of `spec`; at least one request for an LLM with a rate, so every LLM is served.

    The estimate is capped at the rate: an LLM placed with room to spare still only receives its
    rate, so 264 s of it.
    """
    demands = demands_from_spec(spec, *mean_lengths(lengths, limits))
    placement = make_placement("muxserve", demands, cluster, cost, **placement_opts)
    est = placement.meta["llms"]
    return {m.name: max(int(m.rate > 0), int(min(est[m.name]["est_tpt"], m.rate) * BENCH_S * MARGIN))
            for m in spec.llms}
