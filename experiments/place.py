"""Compute a placement, print it as a table, save it as YAML: a Hydra app on the run's config groups.

    python -m experiments.place                                   # or muxsim-place
    python -m experiments.place placement=search workload.alpha=0.9
    python -m experiments.place cost=roofline cluster=h100x8 models=single7b out=place.yaml

It places the workload that `python -m experiments.run` would simulate with the same overrides (a
synthetic one is generated first, so rates and mean lengths are those of the generated trace), so
the table shows the placement a run gets. The YAML goes to `out`, or to placement.yaml in Hydra's
run folder. Config errors stop it before any work, in one line that names the key (exit status 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from experiments.config import (
    CONF_DIR,
    ConfigError,
    absolute,
    build_cluster,
    build_cost,
    build_workload,
    placement_opts,
    validate,
)
from policies.cost import CostModel, CostModelError
from policies.placement import Placement, PlacementError
from policies.placement_algos import (
    Demand,
    demands_from_spec,
    demands_from_workload,
    make_placement,
)
from policies.specs import ClusterSpec, SpecError
from traces import WorkloadError, muxserve_synthetic

# Input that cannot work: reported in one line, not as a traceback.
USER_ERRORS = (ConfigError, CostModelError, PlacementError, SpecError, WorkloadError)

# The paper's set-up with exact rates rather than a generated trace's, for the placement benchmark
# and tests. ShareGPT means the paper's synthetic workload is drawn from (reference notes, "Workloads").
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


def place_from_config(cfg: DictConfig, out: str | Path | None, console: Console | None = None) -> Placement:
    """Build cluster, cost model and workload as a run does, then place with placement.policy."""
    validate(cfg)
    cluster = build_cluster(cfg)
    cost = build_cost(cfg, cluster)
    demands = demands_from_workload(build_workload(cfg))
    policy = str(cfg.placement.policy)
    return place_and_report(demands, cluster, cost, policy, out, console, **placement_opts(cfg, policy))


def check_out(cfg: DictConfig) -> None:
    """`out` must name a file that can be written, checked before the placer runs."""
    if cfg.get("out") is None:
        return
    out = absolute(cfg.out)
    if out.is_dir():
        raise ConfigError(f"out: {out} is a directory; give a file name (e.g. out={out / 'placement.yaml'})")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"out: cannot write {out} ({parent} is not a writable directory)")


def check(cfg: DictConfig) -> None:
    validate(cfg)
    check_out(cfg)


@hydra.main(config_path=str(CONF_DIR), config_name="place", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    out = absolute(cfg.out) if cfg.out else Path(HydraConfig.get().runtime.output_dir) / "placement.yaml"
    try:
        check_out(cfg)
        place_from_config(cfg, out)
    except USER_ERRORS as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system refused `out` after all (full disk, permissions)
        print(f"ConfigError: out: cannot write {out} ({e.strerror})", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    from experiments.precheck import exit_on, precheck

    exit_on(precheck(sys.argv[1:], config_name="place", check=check))
    _hydra_main()


if __name__ == "__main__":
    main()
