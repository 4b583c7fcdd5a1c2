"""Small builders shared by the simulator tests: constant tables, one-unit placements, workloads."""

from __future__ import annotations

import numpy as np
import pandas as pd

from policies.cost import TableCostModel
from policies.placement import LLMPlacement, Placement, Unit
from policies.specs import MODEL_PRESETS
from traces.schema import Workload


def table(prefill_s: float = 0.1, decode_s: float = 0.01, per_token: float = 0.0) -> TableCostModel:
    """A measured-table cost model over llama-7b; latency = constant (+ per_token × length)."""
    rows = []
    for sm in (10, 100):
        for b in (1, 512):
            for s in (1, 4096):
                rows.append(("llama-7b", 1, sm, b, s, "prefill", 1e3 * (prefill_s + per_token * s)))
                rows.append(("llama-7b", 1, sm, b, s, "decode", 1e3 * (decode_s + per_token * s / 100)))
    df = pd.DataFrame(rows, columns=["model", "tp", "sm_pct", "batch", "seq_len", "phase", "latency_ms"])
    return TableCostModel.from_frame(df, label="test table")


def one_unit(names: list[str], kv_blocks: int = 10**6, decode_sm: int = 40, prefill_sm: int = 80,
             max_batch: int = 64, rates: list[float] | None = None) -> Placement:
    llms = tuple(LLMPlacement(n, "llama-7b", 1, prefill_sm, decode_sm, max_batch, rate=(rates or [1.0] * len(names))[i])
                 for i, n in enumerate(names))
    return Placement("test", (Unit(0, 0, (0,), llms, kv_blocks),))


def workload(rows: list[tuple[str, float, int, int]]) -> Workload:
    df = pd.DataFrame(rows, columns=["model", "arrival_s", "prompt_tokens", "output_tokens"])
    df = df.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    df.insert(0, "request_id", np.arange(len(df)))
    return Workload(df, {"source": "test"})


SPECS = MODEL_PRESETS
