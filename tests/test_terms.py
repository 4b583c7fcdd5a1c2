"""`python -m hwloop.terms mixed` on a real vLLM worker (CPU, a tiny Llama with dummy weights): the
check of `policies.cost.mixed_step_time`'s formula, with fewer cycles than the command's."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from hwloop.terms import MIXED_BATCHES, MIXED_PROMPT_TOKENS, measure_mixed_step
from policies.specs import ModelSpec

pytest.importorskip("vllm")
pytestmark = [pytest.mark.hw, pytest.mark.slow, pytest.mark.timeout(300)]

TINY = ModelSpec("tiny", 2, 128, 2, 2, 344, 1024, max_context=512)


def test_a_mixed_step_costs_what_the_formula_charges_not_the_sum_of_its_parts(tmp_path: Path) -> None:
    """Every row measured and within noise of the formula; the mixed step, which does both parts'
    work, not faster than the larger part alone (over the rows: one row's medians of 8 cycles can
    be off by a quarter under other load); and the smallest case (one decode admitting 16 tokens,
    both parts little more than a step's fixed cost) well below the plain sum, which pays it twice."""
    result = measure_mixed_step(TINY, (min(os.sched_getaffinity(0)),), tmp_path, cycles=8)
    rows = result["mixed"]["rows"]
    assert [(r["batch"], r["prompt_tokens"]) for r in rows] == [(b, n) for b in MIXED_BATCHES for n in MIXED_PROMPT_TOKENS]
    for r in rows:
        assert all(math.isfinite(v) and v > 0 for v in r.values()), r
        assert 0.5 <= r["formula_over_mixed"] <= 2, r
    assert np.median([r["mixed_ms"] / max(r["prefill_ms"], r["decode_ms"]) for r in rows]) >= 0.9, rows
    assert rows[0]["sum_over_mixed"] > 1.2, rows[0]
