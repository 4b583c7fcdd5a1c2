"""Metrics from request records: the one module both the simulator and hardware runs are judged by.

Definitions (MuxServe §5, with its P99 taken globally rather than averaged per LLM):
- latency = finish − arrival; TTFT = first token − arrival; TPOT = (finish − first token) / output.
- throughput = finished requests / makespan (first arrival to last finish), per LLM and in total;
  the cluster figure MuxServe reports is the rate-weighted mean of the per-LLM throughputs.
- SLO attainment at scale k = share of all requests (failed ones count as misses) whose latency is
  within k × the latency the same request would see alone on its spatial-baseline GPUs at 100% SM,
  from the same cost model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from policies.cost import CostModel
from policies.specs import ModelSpec

SLO_SCALES: tuple[float, ...] = (1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 50, 75, 100)
PERCENTILES = (50, 90, 99)


def standalone_latency(records: pd.DataFrame, model_of: dict[str, ModelSpec], tp_of: dict[str, int],
                       cost: CostModel) -> np.ndarray:
    """Each request's latency served alone at 100% SM: prefill(1, prompt) + its decode steps.

    Decode steps run at growing context (prompt+1 … prompt+output−1), exactly as the simulator
    times them, so an unloaded simulation attains 100% at scale 1. Prefix sums over context length
    make this O(requests), not O(tokens).
    """
    out = np.empty(len(records))
    for llm, idx in records.groupby("model", sort=False).indices.items():
        spec, tp = model_of[llm], tp_of[llm]
        prompt = records["prompt_tokens"].to_numpy()[idx]
        output = records["output_tokens"].to_numpy()[idx]
        top = int((prompt + output).max()) + 1
        per_ctx = cost.decode_times(spec, tp, 100, 1, np.arange(top, dtype=float))
        prefix = np.concatenate(([0.0], np.cumsum(per_ctx)))
        decode = prefix[prompt + output] - prefix[prompt + 1]
        prefill = np.array([cost.prefill_time(spec, tp, 100, 1, float(p)) for p in prompt])
        out[idx] = prefill + decode
    return out


def slo_attainment(records: pd.DataFrame, baseline: np.ndarray, scales: Sequence[float] = SLO_SCALES) -> pd.Series:
    latency = (records["finish_s"] - records["arrival_s"]).to_numpy()
    ok = records["status"].to_numpy() == "finished"
    if len(records) == 0:
        return pd.Series(np.nan, index=list(scales), name="slo_attainment")
    values = [float(np.mean(ok & (latency <= k * baseline))) for k in scales]
    return pd.Series(values, index=list(scales), name="slo_attainment")


def _latency_columns(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "latency_s": df["finish_s"] - df["arrival_s"],
        "ttft_s": df["first_token_s"] - df["arrival_s"],
        "tpot_s": (df["finish_s"] - df["first_token_s"]) / df["output_tokens"],
    })


def _describe(lat: pd.DataFrame, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for col in lat.columns:
        name = col.removesuffix("_s")
        values = lat[col].to_numpy()
        out[f"{prefix}{name}_mean_s"] = float(np.mean(values)) if len(values) else math.nan
        for p in PERCENTILES:
            out[f"{prefix}{name}_p{p}_s"] = float(np.percentile(values, p)) if len(values) else math.nan
    return out


@dataclass
class Summary:
    overall: dict[str, float]
    per_llm: pd.DataFrame
    slo: pd.Series


def summarize(records: pd.DataFrame, baseline: np.ndarray | None = None,
              rates: dict[str, float] | None = None, slo_scales: Sequence[float] = SLO_SCALES,
              goodput_scale: float = 5.0) -> Summary:
    """Throughput, latency percentiles, goodput and the SLO curve of one run's records."""
    finished = records[records["status"] == "finished"]
    if len(finished):
        makespan = float(finished["finish_s"].max() - records["arrival_s"].min())
    else:
        makespan = math.nan
    lat = _latency_columns(finished)
    per_llm_rows = []
    for llm, g in records.groupby("model", sort=False):
        done = g[g["status"] == "finished"]
        row = {"model": llm, "requests": len(g), "finished": len(done),
               "throughput_rps": len(done) / makespan if makespan else math.nan,
               "tokens_per_s": float(done["output_tokens"].sum()) / makespan if makespan else math.nan,
               "rate_rps": (rates or {}).get(llm, math.nan),
               "preemptions": int(g["preemptions"].sum())}
        row.update(_describe(_latency_columns(done)))
        per_llm_rows.append(row)
    per_llm = pd.DataFrame(per_llm_rows)
    weights = per_llm["rate_rps"] if rates else per_llm["requests"].astype(float)
    overall: dict[str, float] = {
        "requests": float(len(records)),
        "finished": float(len(finished)),
        "failed": float(len(records) - len(finished)),
        "makespan_s": makespan,
        "throughput_rps": len(finished) / makespan if makespan else math.nan,
        "tokens_per_s": float(finished["output_tokens"].sum()) / makespan if makespan else math.nan,
        "rate_weighted_throughput_rps": float(np.average(per_llm["throughput_rps"], weights=weights))
        if len(per_llm) and weights.sum() > 0 else math.nan,
        "preemptions": float(records["preemptions"].sum()),
    }
    overall.update(_describe(lat))
    slo = pd.Series(dtype=float, name="slo_attainment")
    if baseline is not None:
        slo = slo_attainment(records, baseline, slo_scales)
        for k, v in slo.items():
            overall[f"slo_attainment@{k:g}"] = v
        latency = (records["finish_s"] - records["arrival_s"]).to_numpy()
        good = (records["status"].to_numpy() == "finished") & (latency <= goodput_scale * baseline)
        overall[f"goodput_rps@{goodput_scale:g}"] = float(good.sum()) / makespan if makespan else math.nan
    return Summary(overall, per_llm, slo)


def max_rate_within_slo(attainment_at: Callable[[float], float], lo: float, hi: float,
                        target: float = 0.99, tolerance: float = 0.02, max_probes: int = 12) -> float:
    """Highest rate scale whose SLO attainment stays ≥ target, by bisection over [lo, hi].

    `attainment_at(scale)` runs the system at that load. Attainment falls with load, so bisection
    finds the knee; returns `lo` if even that misses the target (0.0 then), `hi` if hi meets it.
    """
    if attainment_at(hi) >= target:
        return hi
    if attainment_at(lo) < target:
        return 0.0
    for _ in range(max_probes):
        if hi - lo <= tolerance * hi:
            break
        mid = (lo + hi) / 2
        if attainment_at(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo
