"""Request lengths (prompt, output tokens) for generated workloads.

Throughput depends on lengths as much as on rates (a 65B decode step is cheap, a thousand of them
are not), so the length source is explicit and recorded in the Workload's metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from traces.schema import WorkloadError

if TYPE_CHECKING:
    from traces.schema import Workload


class LengthSampler(Protocol):
    """Anything that draws n (prompt, output) token pairs from a numpy Generator."""

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class LognormalLengths:
    """Independent lognormal prompt and output lengths, in the parameters of the underlying normal.

    Lognormal because token lengths of chat traces are right-skewed with a long tail; independent
    because ShareGPT's prompt/output correlation is weak and no published figure pins it down.
    """

    prompt_mu: float
    prompt_sigma: float
    output_mu: float
    output_sigma: float

    @classmethod
    def from_means(
        cls, prompt_mean: float, output_mean: float, sigma: float = 1.0
    ) -> LognormalLengths:
        """Lognormals with the given means *before* clipping (mean = exp(mu + sigma²/2))."""
        # sigma past 10 puts almost every draw at 0 or beyond any context (and sigma² overflows).
        if not (0 < prompt_mean < math.inf and 0 < output_mean < math.inf and 0 <= sigma <= 10):
            raise WorkloadError(
                f"LognormalLengths: means must be finite and > 0, sigma within [0, 10] "
                f"(got {prompt_mean}, {output_mean}, {sigma})"
            )
        shift = sigma**2 / 2
        return cls(
            float(np.log(prompt_mean) - shift), sigma, float(np.log(output_mean) - shift), sigma
        )

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        prompt = rng.lognormal(self.prompt_mu, self.prompt_sigma, n)
        output = rng.lognormal(self.output_mu, self.output_sigma, n)
        return np.rint(prompt).astype(np.int64), np.rint(output).astype(np.int64)


@dataclass(frozen=True)
class EmpiricalLengths:
    """Resample whole (prompt, output) pairs of a real trace, keeping their joint distribution."""

    prompt: np.ndarray
    output: np.ndarray
    label: str = "empirical"

    @classmethod
    def from_workload(cls, workload: Workload) -> EmpiricalLengths:
        return cls(
            workload.df["prompt_tokens"].to_numpy(np.int64),
            workload.df["output_tokens"].to_numpy(np.int64),
            label=f"empirical({workload.meta.get('source', '<workload>')})",
        )

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.prompt) == 0:
            raise WorkloadError(f"{self.label}: no lengths to resample from")
        idx = rng.integers(0, len(self.prompt), n)
        return self.prompt[idx], self.output[idx]

    def __repr__(self) -> str:  # the arrays would flood Workload metadata
        return f"EmpiricalLengths({self.label}, n={len(self.prompt)})"


@dataclass(frozen=True)
class LengthLimits:
    """Clip lengths into a serving engine's limits. None means unbounded."""

    prompt_min: int = 1
    prompt_max: int | None = None
    output_min: int = 1
    max_total: int | None = None  # prompt + output, i.e. the model's context length

    def __post_init__(self) -> None:
        lowest_total = self.prompt_min + self.output_min
        if (
            self.prompt_min < 1
            or self.output_min < 1
            or (self.prompt_max is not None and self.prompt_max < self.prompt_min)
            or (self.max_total is not None and self.max_total < lowest_total)
        ):
            raise WorkloadError(
                f"{self}: contradictory limits (minimums must be >= 1 and fit the maximums)"
            )

    def clip(
        self, prompt: np.ndarray, output: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """Clipped copies plus how many prompts/outputs were changed (recorded, not hidden)."""
        prompt_max = self.prompt_max
        if self.max_total is not None:  # leave room for the shortest output
            cap = self.max_total - self.output_min
            prompt_max = cap if prompt_max is None else min(prompt_max, cap)
        p = np.clip(prompt, self.prompt_min, prompt_max)
        o = np.clip(output, self.output_min, None if self.max_total is None else self.max_total - p)
        changed = {"prompt": int((p != prompt).sum()), "output": int((o != output).sum())}
        return p.astype(np.int64), o.astype(np.int64), changed


@dataclass(frozen=True)
class ScaledLengths:
    """Another sampler's lengths times a factor each (rounded): same shape, other means."""

    base: LengthSampler
    prompt_factor: float
    output_factor: float

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        prompt, output = self.base.sample(rng, n)
        return (np.rint(prompt * self.prompt_factor).astype(np.int64),
                np.rint(output * self.output_factor).astype(np.int64))


def rescaled_to_means(base: LengthSampler, prompt_mean: float, output_mean: float, limits: LengthLimits,
                      calibration: int = 200_000) -> ScaledLengths:
    """`base` scaled so that, after clipping into `limits`, the mean prompt and output lengths are
    the given ones (a workload that states its means, e.g. MuxServe's avg_prompt_len/avg_output_len).

    The factors are solved by bisection on one fixed calibration sample (seed 0), so the result is
    deterministic; the prompt first, since clipping the output depends on the prompt. Means that
    the limits cannot reach (within 1%) raise WorkloadError.
    """
    prompt, output = base.sample(np.random.default_rng(0), calibration)

    def means(fp: float, fo: float) -> tuple[float, float]:
        p, o, _ = limits.clip(np.rint(prompt * fp), np.rint(output * fo))
        return float(p.mean()), float(o.mean())

    def solve(target: float, mean_at: Callable[[float], float]) -> float:
        lo, hi = -12.0, 12.0  # log2 of the factor: 1/4096 … 4096
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_at(2**mid) < target else (lo, mid)
        return 2 ** ((lo + hi) / 2)

    fp = solve(prompt_mean, lambda f: means(f, 1.0)[0])
    fo = solve(output_mean, lambda f: means(fp, f)[1])
    got = means(fp, fo)
    for what, want, have in (("prompt", prompt_mean, got[0]), ("output", output_mean, got[1])):
        if abs(have - want) > 0.01 * want:
            raise WorkloadError(f"mean {what} length {want:g} is out of reach within {limits} "
                                f"(the closest is {have:.1f})")
    return ScaledLengths(base, fp, fo)


# MuxServe (via vLLM's ShareGPT sampler): prompt 4..1024, output >= 4, prompt + output <= 2048.
MUXSERVE_LIMITS = LengthLimits(prompt_min=4, prompt_max=1024, output_min=4, max_total=2048)

# A parametric stand-in for ShareGPT, NOT the dataset: lognormals with sigma = 1 (an assumption)
# whose mu were solved numerically so that, after MUXSERVE_LIMITS clipping, the means are the
# published 161 (prompt) and 338 (output) tokens. Medians come out near 101 and 214. Use
# EmpiricalLengths on a loaded ShareGPT file when the real shape matters.
SHAREGPT_FIT = LognormalLengths(
    prompt_mu=4.6117, prompt_sigma=1.0, output_mu=5.3673, output_sigma=1.0
)
