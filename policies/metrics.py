"""Metrics from request records: the one module both the simulator and hardware runs are judged by.

Definitions (MuxServe §5, with its P99 taken globally rather than averaged per LLM):
- latency = finish − arrival; TTFT = first token − arrival; TPOT = (finish − first token) / output.
- the paper's throughput = finished requests / makespan (first arrival to last finish), per LLM and
  in total; the cluster figure MuxServe reports is the rate-weighted mean of the per-LLM throughputs.
  Once a system is overloaded this measures how long its backlog takes to drain, so it grows with
  the length of the trace.
- steady-state throughput = requests finished inside the arrival window after a warm-up, divided by
  that window's length, per LLM (each over its own arrivals) and summed: the served rate while
  requests keep arriving, drain excluded. Below saturation it is the offered rate; above, the
  system's capacity; either way it does not depend on how long the trace is, once the run is long
  enough to have settled. The warm-up is detected (MSER-5, `settling`), not fixed: a system
  near its capacity can take minutes to settle, an idle one seconds. A run is `settled` when MSER
  vouches for its cut and what is kept shows no drift between its halves.
- goodput at SLO scale k: the same count restricted to requests within k × standalone latency.
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

SLO_SCALES: tuple[float, ...] = (1, 1.5, 2, 3, 4, 5, 7.5, 8, 10, 15, 20, 30, 50, 75, 100)
PERCENTILES = (50, 90, 99)
# Warm-up detection by MSER-5 (White 1997; batches of 5 as Spratt 1998), on the run's served counts.
# One count per second: finer than any warm-up worth detecting (seconds to minutes) and, at the
# studies' rates (tens to hundreds of requests per second), many requests per count.
SERIES_STEP_S = 1.0
MSER_BATCH = 5  # MSER-5: the rule runs on means of 5 consecutive counts
# MSER's statistic rests on fewer batches as the truncation nears the end (it is 0 at one batch), and
# a minimum there is chance: truncations keep at least this many batches (50 s). Measured on flat
# Poisson counts (tests/test_steady_state.py), keeping 5 called 6–12% of 100–200 s series unsettled,
# keeping 10 about 2% of 200 s ones and under 1% from 300 s; the price is that a series must have
# more than 20 batches (100 s) before the rule can vouch for it at all.
MSER_MIN_TAIL = 10
# Batch means for the steady figure's standard error: 10 batches, the fewest Schmeiser (1982) found
# enough for a confidence interval; fewer, longer batches are the least correlated with each other.
SE_BATCHES = 10
# Two-sided 5% point of Student's t with 8 degrees of freedom: the kept series' two halves of 5 batch
# means each (`drift_t`) differ by more than this many standard errors 1 time in 20 by chance alone.
DRIFT_T_CRITICAL = 2.306


@dataclass(frozen=True)
class Truncation:
    """MSER's answer on a series of batch means: how many batches to cut, and whether the run could
    vouch for it (the unrestricted minimum lies in the first half of a series long enough to look
    past its middle)."""

    batches: int
    settled: bool


def mser_statistic(batch_means: np.ndarray) -> np.ndarray:
    """MSER(d) = Σ_{i≥d} (Z_i − mean of Z_d…)² / (m − d)² for every d in 0…m−1 (White 1997).

    The squared standard error of the kept mean, up to a constant: cutting a biased start lowers the
    sum, cutting too much raises it through the shrinking denominator. Suffix sums make it O(m);
    centring first keeps them from cancelling (a constant series gives exact zeros).
    """
    z = np.asarray(batch_means, dtype=float)
    z = z - z.mean() if len(z) else z
    kept = np.arange(len(z), 0, -1, dtype=float)  # m − d
    total = np.cumsum(z[::-1])[::-1]
    squares = np.cumsum((z * z)[::-1])[::-1]
    return (squares - total * total / kept) / (kept * kept)


def mser_truncation(series: np.ndarray, batch: int = MSER_BATCH, min_tail: int = MSER_MIN_TAIL) -> Truncation:
    """MSER-m: the truncation (in batches of `batch` values, leftovers at the end dropped) that
    minimises `mser_statistic`, searched up to half the batches as White's rule has it.

    Settled when the minimum over every truncation that keeps `min_tail` batches also lies within the
    first half. A minimum beyond the half means the series was still moving late in the run; a series
    of at most 2 × `min_tail` batches cannot look past its half at all. Either way the run is too short
    to say it settled: the truncation is then the best within the first half, flagged.
    """
    m = len(series) // batch
    if m < min_tail:  # not even one admissible truncation
        return Truncation(0, False)
    means = np.asarray(series[:m * batch], dtype=float).reshape(m, batch).mean(axis=1)
    stat = mser_statistic(means)[:m - min_tail + 1]
    within_half = int(np.argmin(stat[:m // 2 + 1]))
    settled = m > 2 * min_tail and int(np.argmin(stat)) <= m // 2
    return Truncation(within_half, settled)


@dataclass(frozen=True)
class ArrivalWindows:
    """Each LLM's arrival window [first, last arrival], and the run's start (its first arrival)."""

    first: pd.Series  # by model
    last: pd.Series

    @classmethod
    def of(cls, records: pd.DataFrame) -> ArrivalWindows:
        by = records.groupby("model", sort=False)["arrival_s"]
        return cls(by.min(), by.max())

    @property
    def start_s(self) -> float:
        return float(self.first.min())

    @property
    def common_end_s(self) -> float:
        """The earliest end among LLMs with a window (a one-request LLM has none): until then every
        such LLM is still arriving, so the system's served rate has a steady target. Paper-sized runs
        end their LLMs' arrivals at different times; past the first end the total would step down."""
        spans = self.last > self.first
        return float(self.last[spans].min()) if spans.any() else self.start_s


def served_per_step(records: pd.DataFrame, windows: ArrivalWindows, step_s: float = SERIES_STEP_S) -> np.ndarray:
    """Requests finished per `step_s`, all LLMs together, from the first arrival to the common end.

    A request counts only when it finishes inside its own LLM's arrival window, as the steady-state
    figure counts it, so the series shows the served rate the figure measures.
    """
    steps = int((windows.common_end_s - windows.start_s) // step_s)
    first = records["model"].map(windows.first).to_numpy(dtype=float)
    last = records["model"].map(windows.last).to_numpy(dtype=float)
    finish = records["finish_s"].to_numpy(dtype=float)
    inside = (records["status"].to_numpy() == "finished") & (finish >= first) & (finish <= last)
    index = np.floor((finish[inside] - windows.start_s) / step_s).astype(int)
    return np.bincount(index[index < steps], minlength=steps).astype(float)


def batch_means(series: np.ndarray, batches: int = SE_BATCHES) -> np.ndarray | None:
    """Means of `batches` equal, consecutive parts of the series (leftovers dropped at its start, the
    end of a warm-up); None when it has fewer values than batches.

    Served counts are autocorrelated (a batch of decodes finishes together, a strict FCFS mesh swings
    for a minute), so per-second counts would understate any error; a few long batches are nearly
    independent.
    """
    size = len(series) // batches
    if size == 0:
        return None
    return np.asarray(series[len(series) - size * batches:], dtype=float).reshape(batches, size).mean(axis=1)


def batch_means_relative_se(series: np.ndarray, batches: int = SE_BATCHES) -> float:
    """Standard error of the series' mean, relative to it, by batch means; NaN when too short or idle."""
    means = batch_means(series, batches)
    if means is None or not means.mean() > 0:
        return math.nan
    return float(means.std(ddof=1) / math.sqrt(batches) / means.mean())


def drift_t(series: np.ndarray, batches: int = SE_BATCHES) -> float:
    """Student's t of (mean of the second half − mean of the first), from the batch means of each half.

    MSER keeps the cut that best trades bias for variance over the whole kept series, so a slow
    approach it cannot tell from noise stays in (measured: muxserve's served rate still 7–10% below
    its 10-minute level after 2 minutes, with MSER content). Comparing the halves of what is kept, as
    Geweke's diagnostic compares early and late parts, shows such a drift. NaN when too short.
    """
    means = batch_means(series, batches)
    if means is None:
        return math.nan
    first, second = means[:batches // 2], means[batches // 2:]
    pooled = math.sqrt((first.var(ddof=1) + second.var(ddof=1)) / 2)
    gap = float(second.mean() - first.mean())
    if pooled == 0:
        return 0.0 if gap == 0 else math.copysign(math.inf, gap)
    return gap / (pooled * math.sqrt(1 / len(first) + 1 / len(second)))


@dataclass(frozen=True)
class Settling:
    """How a run's served rate settled, all measured on the detection series (`served_per_step`):
    - the warm-up ends `warmup_s` after the first arrival (at `warmup_end_s`);
    - `mser_settled`: MSER's minimum lies in the first half (`mser_truncation`);
    - `drift_t`: the kept series' second half against its first (`drift_t`);
    - `relative_se`: the served rate's standard error after the warm-up, relative to the rate. The
      series ends with the earliest LLM's arrivals: where the others run on, a little pessimistic.
    """

    warmup_end_s: float
    warmup_s: float
    mser_settled: bool
    drift_t: float
    relative_se: float

    @property
    def settled(self) -> bool:
        """MSER vouches for the cut and the kept halves agree at the 5% level (NaN t: too short)."""
        return self.mser_settled and abs(self.drift_t) <= DRIFT_T_CRITICAL


def settling(records: pd.DataFrame, step_s: float = SERIES_STEP_S) -> Settling:
    """MSER-5 on the run's served counts per second (`served_per_step`), then the drift and the error
    of what is kept.

    One series for the whole system rather than one per LLM: a rarely used LLM serves a request every
    few seconds, too few for MSER to tell a trend from noise, while the busy LLMs, whose queues take
    longest to settle, dominate the total.
    """
    if records.empty:
        return Settling(math.nan, 0.0, False, math.nan, math.nan)
    windows = ArrivalWindows.of(records)
    series = served_per_step(records, windows, step_s)
    cut = mser_truncation(series)
    steps = cut.batches * MSER_BATCH
    kept = series[steps:]
    return Settling(windows.start_s + steps * step_s, steps * step_s, cut.settled, drift_t(kept),
                    batch_means_relative_se(kept))


@dataclass(frozen=True)
class SteadyState:
    """Per LLM, over its steady window (arrival window after the warm-up): how many requests
    arrived, finished and finished within the SLO, and the window's length; and how the run settled."""

    per_llm: pd.DataFrame  # model, window_s, arrived, served, good
    settling: Settling

    @property
    def offered_rps(self) -> float:
        return _rate_sum(self.per_llm, "arrived")

    @property
    def throughput_rps(self) -> float:
        return _rate_sum(self.per_llm, "served")

    @property
    def goodput_rps(self) -> float:
        return _rate_sum(self.per_llm, "good")


def _rate_sum(per_llm: pd.DataFrame, column: str) -> float:
    """Σ over LLMs of count / window; LLMs whose window is empty (one request) add nothing."""
    ok = per_llm["window_s"] > 0
    return float((per_llm.loc[ok, column] / per_llm.loc[ok, "window_s"]).sum()) if ok.any() else math.nan


def steady_counts(records: pd.DataFrame, warmup_end_s: float, within_slo: np.ndarray | None = None) -> pd.DataFrame:
    """Counts over each LLM's window [max(first arrival, warm-up end), last arrival].

    Per LLM, because paper-sized runs give each LLM its own number of requests at its own rate,
    so their arrivals end at different times. `within_slo` marks the requests meeting the SLO.
    """
    arrival = records["arrival_s"].to_numpy()
    finish = records["finish_s"].to_numpy()
    done = records["status"].to_numpy() == "finished"
    good = done if within_slo is None else done & within_slo
    rows = []
    for llm, idx in records.groupby("model", sort=False).indices.items():
        last = float(arrival[idx].max())
        start = min(max(float(arrival[idx].min()), warmup_end_s), last)
        inside = done[idx] & (finish[idx] >= start) & (finish[idx] <= last)
        rows.append({"model": llm, "window_s": last - start,
                     "arrived": int(((arrival[idx] >= start) & (arrival[idx] <= last)).sum()),
                     "served": int(inside.sum()), "good": int((inside & good[idx]).sum())})
    return pd.DataFrame(rows, columns=["model", "window_s", "arrived", "served", "good"])


def steady_state(records: pd.DataFrame, within_slo: np.ndarray | None = None) -> SteadyState:
    """The steady-state counts after the detected warm-up (`settling`)."""
    settled = settling(records)
    return SteadyState(steady_counts(records, settled.warmup_end_s, within_slo), settled)


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
    overall: dict[str, float | bool]  # steady_settled is the one flag
    per_llm: pd.DataFrame
    slo: pd.Series


def summarize(records: pd.DataFrame, baseline: np.ndarray | None = None,
              rates: dict[str, float] | None = None, slo_scales: Sequence[float] = SLO_SCALES,
              goodput_scale: float = 5.0) -> Summary:
    """Throughput (the paper's and steady-state), latency percentiles, goodput and the SLO curve.

    goodput_rps@k counts requests within k × standalone latency over the makespan, as the paper's
    throughput does; steady_goodput_rps@k counts them over the steady window.
    """
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
    latency = (records["finish_s"] - records["arrival_s"]).to_numpy()
    within = None if baseline is None else latency <= goodput_scale * baseline
    steady = steady_state(records, within)
    window = steady.per_llm.set_index("model")["window_s"].replace(0.0, math.nan)
    per_llm["steady_throughput_rps"] = per_llm["model"].map(steady.per_llm.set_index("model")["served"] / window)
    weights = per_llm["rate_rps"] if rates else per_llm["requests"].astype(float)
    overall: dict[str, float | bool] = {
        "requests": float(len(records)),
        "finished": float(len(finished)),
        "failed": float(len(records) - len(finished)),
        "makespan_s": makespan,
        "throughput_rps": len(finished) / makespan if makespan else math.nan,
        "tokens_per_s": float(finished["output_tokens"].sum()) / makespan if makespan else math.nan,
        "rate_weighted_throughput_rps": float(np.average(per_llm["throughput_rps"], weights=weights))
        if len(per_llm) and weights.sum() > 0 else math.nan,
        "preemptions": float(records["preemptions"].sum()),
        "steady_offered_rps": steady.offered_rps,
        "steady_throughput_rps": steady.throughput_rps,
        "steady_throughput_se_rps": steady.throughput_rps * steady.settling.relative_se,
        "steady_warmup_s": steady.settling.warmup_s,
        "steady_drift_t": steady.settling.drift_t,
        "steady_settled": steady.settling.settled,
    }
    overall.update(_describe(lat))
    slo = pd.Series(dtype=float, name="slo_attainment")
    if baseline is not None:
        slo = slo_attainment(records, baseline, slo_scales)
        for k, v in slo.items():
            overall[f"slo_attainment@{k:g}"] = v
        good = (records["status"].to_numpy() == "finished") & within
        overall[f"goodput_rps@{goodput_scale:g}"] = float(good.sum()) / makespan if makespan else math.nan
        overall[f"steady_goodput_rps@{goodput_scale:g}"] = steady.goodput_rps
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
