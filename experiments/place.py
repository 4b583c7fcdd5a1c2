"""Compute a placement, print it as a table, save it as YAML.

    python -m experiments.place --alpha 0.7 --placement muxserve --out outputs/place.yaml

The paper's synthetic set-up (19 LLMs on 4 × 8 A100s) unless --workload names a trace. The work is
in `place_and_report`; `main` only parses arguments, so it can become a Hydra app unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from policies.cost import (
    CompositeCostModel,
    CostModel,
    CostModelError,
    RooflineCostModel,
    TableCostModel,
)
from policies.placement import Placement, PlacementError
from policies.placement_algos import (
    PLACERS,
    Demand,
    demands_from_spec,
    demands_from_workload,
    make_placement,
)
from policies.specs import ClusterSpec
from traces import Workload, WorkloadError, muxserve_synthetic

# ShareGPT means the paper's synthetic workload is drawn from (reference notes, "Workloads").
SHAREGPT_PROMPT, SHAREGPT_OUTPUT = 161.0, 338.0
DEFAULT_TABLE = os.environ.get("MUXSIM_A100_TABLE", "../shared/data/muxserve_llama_a100.json")


def paper_demands(alpha: float, scale: float = 1.0) -> list[Demand]:
    """The paper's 19 LLMs: rate_i = 40·scale·(i+1)^−α, ShareGPT mean lengths."""
    return demands_from_spec(muxserve_synthetic(alpha, scale), SHAREGPT_PROMPT, SHAREGPT_OUTPUT)


def gpu_range(gpus: tuple[int, ...]) -> str:
    return str(gpus[0]) if len(gpus) == 1 else f"{gpus[0]}-{gpus[-1]}"


def placement_table(p: Placement) -> Table:
    t = Table(title=f"{p.policy} placement — {len(p.units)} units", title_justify="left")
    for col in ("unit", "node", "GPUs", "LLM", "model", "tp", "prefill SM", "decode SM", "est. batch",
                "max batch", "est. tpt", "rate"):
        t.add_column(col, justify="left" if col in ("LLM", "model", "GPUs") else "right")
    for u in p.units:
        for k, x in enumerate(u.llms):
            est = p.meta.get("llms", {}).get(x.name, {})
            tpt = est.get("est_tpt", float("nan"))
            style = "red" if tpt < x.rate * (1 - 1e-6) else ""
            first = k == 0
            t.add_row(str(u.unit_id) if first else "", str(u.node) if first else "",
                      gpu_range(u.gpus) if first else "", x.name, x.model, str(x.tp),
                      f"{x.prefill_sm}%", f"{x.decode_sm}%", str(est.get("est_batch", "")), str(x.max_batch),
                      f"{tpt:.2f}", f"{x.rate:.2f}", style=style, end_section=k == len(u.llms) - 1)
    return t


def summary_line(p: Placement) -> str:
    m = p.meta
    return (f"estimated throughput {p.estimated_throughput:.3f} req/s (rate-weighted); serves "
            f"{m.get('served_rate', 0):.2f} of {m.get('total_rate', 0):.2f} req/s; {m.get('idle_gpus', 0)} idle GPU(s); "
            f"placed in {m.get('time_s', 0):.3f} s; cost model: {p.cost_model}")


def place_and_report(demands: list[Demand], cluster: ClusterSpec, cost: CostModel, policy: str = "muxserve",
                     out: str | Path | None = None, console: Console | None = None, **opts: object) -> Placement:
    """Place, print the table (LLMs short of their rate in red) and the totals, save YAML if `out`."""
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    placement = make_placement(policy, demands, cluster, cost, **opts)
    console.print(placement_table(placement))
    console.print(summary_line(placement))
    if out is not None:
        console.print(f"saved {placement.save(out)}")
    return placement


def build_cost(path: str | Path, cluster: ClusterSpec, roofline_fallback: bool) -> CostModel:
    table = TableCostModel.from_muxserve_json(path)
    return CompositeCostModel(table, RooflineCostModel(cluster.gpu)) if roofline_fallback else table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="muxsim-place", description=__doc__.split("\n")[0])
    ap.add_argument("--placement", default="muxserve", choices=list(PLACERS))
    ap.add_argument("--alpha", type=float, default=0.9, help="power-law exponent of the synthetic rates")
    ap.add_argument("--scale", type=float, default=1.0, help="top LLM rate = 40·scale req/s")
    ap.add_argument("--workload", help="place this trace (Parquet/CSV with model_type) instead")
    ap.add_argument("--nnodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--cost", default=DEFAULT_TABLE, help="MuxServe latency JSON (default: $MUXSIM_A100_TABLE)")
    ap.add_argument("--roofline-fallback", action="store_true", help="estimate models/TP the table lacks")
    ap.add_argument("--seed", type=int, default=0, help="seed of the search placer")
    ap.add_argument("--out", help="write the placement here as YAML")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cluster = ClusterSpec(args.nnodes, args.gpus_per_node)
        cost = build_cost(args.cost, cluster, args.roofline_fallback)
        demands = (demands_from_workload(Workload.read(args.workload)) if args.workload
                   else paper_demands(args.alpha, args.scale))
        place_and_report(demands, cluster, cost, args.placement, args.out, seed=args.seed)
    except (PlacementError, CostModelError, WorkloadError, ValueError) as e:
        sys.exit(f"muxsim-place: {e}")


if __name__ == "__main__":
    main()
