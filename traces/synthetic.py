"""Synthetic multi-LLM workloads: a WorkloadSpec plus an arrival process plus a length source.

Arrivals are a renewal process with Gamma inter-arrival times of a given coefficient of variation
(CV): CV = 1 is exactly the Poisson process (Gamma with shape 1 is the exponential), CV > 1 is
burstier. Every LLM draws from its own child seed, so adding or re-rating one LLM leaves every
other LLM's requests unchanged, and the same seed always gives the same table.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from traces.lengths import MUXSERVE_LIMITS, SHAREGPT_FIT, LengthLimits, LengthSampler
from traces.schema import Workload, WorkloadError
from traces.spec import WorkloadSpec

# Peak memory of `generate` per request: 221 B, measured as the growth of peak RSS while generating
# 3.2 million requests (muxserve_synthetic(0.9), 20,000 s). Arrays, table and its validation copy.
GENERATE_BYTES_PER_REQUEST = 221


# Burstier than this and the Gamma shape 1/cv² underflows: the draws are all zeros and one huge gap.
MAX_CV = 100.0


def available_memory_bytes() -> int:
    """Memory the system can give this process now without swapping (Linux MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def expected_requests(spec: WorkloadSpec, duration_s: float) -> float:
    return spec.total_rate * duration_s


def check_size(spec: WorkloadSpec, duration_s: float, bytes_per_request: float = GENERATE_BYTES_PER_REQUEST,
               what: str = "generating them") -> None:
    """Refuse, before any allocation, a workload whose requests would not fit in memory; the message
    gives the expected count and the estimated size."""
    n = expected_requests(spec, duration_s)
    need, have = n * bytes_per_request, available_memory_bytes()
    if not need <= have:
        raise WorkloadError(
            f"{spec.label or 'spec'}: about {n:.3g} requests ({spec.total_rate:.4g} req/s × {duration_s:g} s); "
            f"{what} needs an estimated {need / 2**30:,.1f} GiB (~{bytes_per_request:g} B per request), "
            f"more than the {have / 2**30:,.1f} GiB of memory available"
        )


def seeded(seed: object) -> np.random.Generator:
    """A generator for `seed`, refusing what numpy would fail on deep inside with a traceback."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise WorkloadError(f"seed must be an integer >= 0 (got {seed!r})")
    return np.random.default_rng(int(seed))


def _check_process(rate: float, cv: float) -> None:
    if not math.isfinite(rate) or rate < 0:
        raise WorkloadError(f"arrivals: rate must be a finite number >= 0 (got {rate})")
    if not math.isfinite(cv) or not 0 < cv <= MAX_CV:
        raise WorkloadError(f"arrivals: cv must be a number within (0, {MAX_CV:g}] (got {cv})")


def _gaps(rng: np.random.Generator, rate: float, cv: float, n: int) -> np.ndarray:
    """n Gamma inter-arrival times with mean 1/rate and the given CV (shape 1/cv², scale cv²/rate)."""
    shape = 1.0 / cv**2
    return rng.gamma(shape, 1.0 / (shape * rate), n)


def arrivals_until(
    rng: np.random.Generator, rate: float, duration_s: float, cv: float = 1.0
) -> np.ndarray:
    """Sorted arrival times in [0, duration_s), the process starting fresh at t = 0."""
    _check_process(rate, cv)
    if rate == 0 or duration_s <= 0:
        return np.empty(0)
    expected = rate * duration_s
    # Draw a few standard deviations more than expected in one go; extend in the rare case it ran short.
    batch = int(expected + 6 * cv * math.sqrt(expected) + 16)
    times = np.cumsum(_gaps(rng, rate, cv, batch))
    while times[-1] < duration_s:
        times = np.concatenate([times, times[-1] + np.cumsum(_gaps(rng, rate, cv, batch))])
    return times[: np.searchsorted(times, duration_s)]


def arrivals_count(rng: np.random.Generator, rate: float, n: int, cv: float = 1.0) -> np.ndarray:
    """The first n arrival times of the process: for traces that have requests but no timestamps."""
    _check_process(rate, cv)
    if rate == 0:
        raise WorkloadError("arrivals: rate must be > 0 to place a fixed number of requests")
    return np.cumsum(_gaps(rng, rate, cv, n))


def generate(
    spec: WorkloadSpec,
    duration_s: float,
    seed: int = 0,
    *,
    cv: float = 1.0,
    lengths: LengthSampler = SHAREGPT_FIT,
    limits: LengthLimits = MUXSERVE_LIMITS,
    counts: dict[str, int] | None = None,
) -> Workload:
    """Requests for every LLM of `spec` over [0, duration_s), sorted by arrival, ids 0..N−1.

    With `counts`, each LLM instead gets exactly that many requests at its rate from t = 0 (how
    MuxServe's benchmarks size their runs), and `duration_s` is unused. Lengths are drawn from
    `lengths` and clipped into `limits` (pass LengthLimits() to keep them as drawn); how many were
    clipped is recorded in meta["clipped"].
    """
    if counts is None and (not math.isfinite(duration_s) or duration_s <= 0):
        raise WorkloadError(f"generate: duration_s must be a finite number > 0 (got {duration_s})")
    if counts is not None:
        bad = {m.name: counts.get(m.name) for m in spec.llms
               if not isinstance(counts.get(m.name), int) or counts[m.name] < 0 or (counts[m.name] and m.rate <= 0)}
        if bad:
            name, n = next(iter(bad.items()))
            raise WorkloadError(f"generate: LLM {name!r}: request count must be an integer >= 0, and 0 "
                                f"for an LLM of rate 0 (got {n!r})")
    if counts is None:  # explicit counts are the caller's, sized from a placement's throughput
        check_size(spec, duration_s)
    seeded(seed)
    children = np.random.SeedSequence(seed).spawn(len(spec.llms))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for child, llm in zip(children, spec.llms, strict=True):
        rng = np.random.default_rng(child)
        if counts is None:
            times = arrivals_until(rng, llm.rate, duration_s, cv)
        else:
            times = arrivals_count(rng, llm.rate, counts[llm.name], cv) if counts[llm.name] else np.empty(0)
        prompt, output = lengths.sample(rng, len(times))
        parts.append((times, prompt, output))
    sizes = np.array([len(t) for t, _, _ in parts])
    if sizes.sum() == 0:
        raise WorkloadError(
            f"generate: {spec.label or 'spec'} produced no requests"
            + (f" in {duration_s} s (rates too low?)" if counts is None else " (all counts are 0)")
        )
    times = np.concatenate([t for t, _, _ in parts])
    prompt, output, clipped = limits.clip(
        np.concatenate([p for _, p, _ in parts]), np.concatenate([o for _, _, o in parts])
    )
    llm_index = np.repeat(np.arange(len(spec.llms)), sizes)
    order = np.argsort(times, kind="stable")  # ties (never in practice) keep spec order
    names = np.array([m.name for m in spec.llms], dtype=object)
    types = np.array([m.model_type for m in spec.llms], dtype=object)
    df = pd.DataFrame(
        {
            "request_id": np.arange(len(order), dtype=np.int64),
            "model": names[llm_index[order]],
            "arrival_s": times[order],
            "prompt_tokens": prompt[order],
            "output_tokens": output[order],
            "model_type": types[llm_index[order]],
        }
    )
    meta = {
        "source": "synthetic",
        "format": "synthetic",
        "spec": spec.to_dict(),
        "duration_s": duration_s if counts is None else None,
        "counts": counts,
        "seed": seed,
        "cv": cv,
        "lengths": repr(lengths),
        "limits": repr(limits),
        "clipped": clipped,
    }
    return Workload(df, meta)


def counts_by_rate(spec: WorkloadSpec, total: int) -> dict[str, int]:
    """`total` requests split over the LLMs in proportion to their rates, summing exactly to
    `total` (largest remainders): a fixed request set such as MuxServe's 8,091 ChatLMSYS requests."""
    rates = np.array([m.rate for m in spec.llms], dtype=float)
    if total < 1 or rates.sum() <= 0:
        raise WorkloadError(f"counts_by_rate: need total >= 1 and some rate > 0 (got {total}, {rates.sum()})")
    share = total * rates / rates.sum()
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return {m.name: int(n) for m, n in zip(spec.llms, counts, strict=True)}
