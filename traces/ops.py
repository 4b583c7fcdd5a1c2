"""Operations on Workloads: rescale time, cut a window, sample, summarise, fit popularity.

Each returns a new Workload and records what it did in the metadata, so a result can be traced
back to the exact transformation of the source trace. Anything that removes requests says how
many and why (a WARNING log and meta["dropped"]).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from traces.schema import DropLog, Workload, WorkloadError
from traces.synthetic import seeded

logger = logging.getLogger("traces")

# Arrivals further apart than this leave an executor with nothing to do: every request before the
# gap has long finished (the slowest step of MuxServe's A100 table is 11 s; a request of a few
# thousand tokens is served in minutes). Simulating the empty hours only costs time, and a trace
# whose timestamps span a century (a wrong year in one row) would never finish.
MAX_IDLE_GAP_S = 3600.0


def _source(workload: Workload) -> str:
    return str(workload.meta.get("source", "<workload>"))


def _positive(name: str, value: float, workload: Workload) -> None:
    if not math.isfinite(value) or value <= 0:
        raise WorkloadError(
            f"{_source(workload)}: {name} must be a finite number > 0 (got {value})"
        )


def rescale_time(workload: Workload, factor: float) -> Workload:
    """Multiply every arrival time by `factor` (< 1 compresses the trace, raising every rate)."""
    _positive("time factor", factor, workload)
    df = workload.df.assign(arrival_s=workload.df["arrival_s"] * factor)
    return workload.with_frame(df, time_scale=workload.meta.get("time_scale", 1.0) * factor)


def rescale_rate(
    workload: Workload, factor: float | None = None, *, total_rate: float | None = None
) -> Workload:
    """Multiply every rate by `factor`, or scale so the whole trace runs at `total_rate` req/s.

    A rate factor k divides inter-arrival times by k: this is MuxServe's "condense" of a real trace
    (ChatLMSYS used 500–2000). Relative burstiness and popularity are unchanged.
    """
    if (factor is None) == (total_rate is None):
        raise WorkloadError(f"{_source(workload)}: give exactly one of a rate factor or total_rate")
    if total_rate is not None:
        _positive("total_rate", total_rate, workload)
        if workload.duration_s <= 0:
            raise WorkloadError(f"{_source(workload)}: cannot set a rate on a trace that spans 0 s")
        factor = total_rate / (len(workload) / workload.duration_s)
    assert factor is not None
    _positive("rate factor", factor, workload)
    return rescale_time(workload, 1.0 / factor)


def window(
    workload: Workload,
    start_s: float | None = None,
    end_s: float | None = None,
    *,
    rebase: bool = True,
) -> Workload:
    """Requests arriving in [start_s, end_s); with `rebase`, times restart from start_s = 0."""
    t = workload.df["arrival_s"].to_numpy()
    lo = -math.inf if start_s is None else start_s
    hi = math.inf if end_s is None else end_s
    if not lo < hi:
        raise WorkloadError(
            f"{_source(workload)}: window [{start_s}, {end_s}) is empty (start must be < end)"
        )
    drops = DropLog(_source(workload))
    df = drops.drop(workload.df, (t < lo) | (t >= hi), f"outside the window [{start_s}, {end_s}) s")
    if df.empty:
        raise WorkloadError(
            f"{_source(workload)}: window [{start_s}, {end_s}) s holds no requests "
            f"(arrivals span {t[0]:.3f}..{t[-1]:.3f} s)"
        )
    if rebase and start_s is not None:
        df = df.assign(arrival_s=df["arrival_s"] - start_s)
    return workload.with_frame(
        df, window_s=[start_s, end_s], dropped=drops.merged_into(workload.meta)
    )


def skip_idle(workload: Workload, max_gap_s: float = MAX_IDLE_GAP_S) -> Workload:
    """The same requests with every gap between consecutive arrivals longer than `max_gap_s`
    shortened to `max_gap_s`, and a WARNING that says how much time was skipped (meta["skipped_s"]).

    Rates are over the remaining span, which is what the served requests see.
    """
    _positive("max_gap_s", max_gap_s, workload)
    t = workload.df["arrival_s"].to_numpy()
    gaps = np.diff(t)
    long = gaps > max_gap_s
    if not long.any():
        return workload
    skipped = float((gaps[long] - max_gap_s).sum())
    logger.warning("%s: %d request(s) span %.3g s; %d idle gap(s) longer than %g s shortened to %g s "
                   "(%.3g s of empty time skipped)", _source(workload), len(t), t[-1] - t[0], int(long.sum()),
                   max_gap_s, max_gap_s, skipped)
    shortened = t[0] + np.concatenate([[0.0], np.cumsum(np.minimum(gaps, max_gap_s))])
    return workload.with_frame(workload.df.assign(arrival_s=shortened),
                               skipped_s=workload.meta.get("skipped_s", 0.0) + skipped)


def sample(workload: Workload, n: int, seed: int = 0) -> Workload:
    """n requests chosen uniformly without replacement (seeded), kept in arrival order."""
    if not 0 < n <= len(workload):
        raise WorkloadError(f"{_source(workload)}: cannot sample {n} of {len(workload)} requests")
    keep = np.zeros(len(workload), dtype=bool)
    keep[seeded(seed).choice(len(workload), n, replace=False)] = True
    drops = DropLog(_source(workload))
    df = drops.drop(workload.df, ~keep, f"not in a random sample of {n} (seed {seed})")
    return workload.with_frame(
        df, sample={"n": n, "seed": seed}, dropped=drops.merged_into(workload.meta)
    )


PERCENTILES = (50, 90, 99)


def _row(name: str, df: pd.DataFrame, span_s: float) -> dict[str, float | str | int]:
    gaps = np.diff(df["arrival_s"].to_numpy())
    cv = float(gaps.std() / gaps.mean()) if len(gaps) >= 2 and gaps.mean() > 0 else math.nan
    row: dict[str, float | str | int] = {
        "model": name,
        "requests": len(df),
        "rate_rps": len(df) / span_s if span_s > 0 else math.nan,
        "iat_cv": cv,
    }
    for col, key in (("prompt_tokens", "prompt"), ("output_tokens", "output")):
        values = df[col].to_numpy()
        row[f"{key}_mean"] = float(values.mean())
        for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
            row[f"{key}_p{p}"] = float(v)
    return row


def stats(workload: Workload) -> pd.DataFrame:
    """One row per model, most requested first, then an "(all)" row for the whole trace.

    Rates are over the whole trace's span (so they add up); iat_cv is the coefficient of variation
    of a model's inter-arrival times: ≈1 for Poisson, >1 for bursty traffic.
    """
    span = workload.duration_s
    rows = [_row(str(m), g, span) for m, g in workload.df.groupby("model", sort=False)]
    rows.sort(key=lambda r: (-int(r["requests"]), str(r["model"])))
    rows.append(_row("(all)", workload.df, span))
    return pd.DataFrame(rows)


def fit_alpha(workload: Workload, order: list[str] | None = None) -> float:
    """Power-law popularity exponent α (rate_i ∝ rank_i^−α) by maximum likelihood.

    Counts are treated as Poisson with means A·rank^−α; profiling out A leaves a multinomial
    likelihood in α alone, maximised numerically. Unlike least squares on log rate vs log rank,
    this weights each model by its evidence, so the rarely requested tail does not dominate.
    Ranks follow `order` (e.g. the spec's popularity order; models absent from the trace count 0)
    or, by default, the observed request counts.
    """
    counts = workload.df["model"].value_counts()
    if order is None:
        c = counts.sort_values(ascending=False, kind="stable").to_numpy(dtype=np.float64)
    else:
        c = np.array([counts.get(m, 0) for m in order], dtype=np.float64)
    if len(c) < 2:
        raise WorkloadError(
            f"{_source(workload)}: fitting a popularity exponent needs at least 2 models"
        )
    log_rank = np.log(np.arange(1, len(c) + 1, dtype=np.float64))

    def negative_log_likelihood(alpha: float) -> float:
        log_w = -alpha * log_rank
        log_total = np.logaddexp.reduce(log_w)
        return -float(np.dot(c, log_w) - c.sum() * log_total)

    result = minimize_scalar(
        negative_log_likelihood, bounds=(0.0, 10.0), method="bounded", options={"xatol": 1e-6}
    )
    return float(result.x)
