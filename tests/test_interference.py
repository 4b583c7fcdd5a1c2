"""The interference term of the cost model and the co-run bookkeeping of hwloop.interference.

The fits here run on synthetic tables made from known coefficients: they test the fitting code,
not the hardware. Measured tables come from `python -m experiments.gpu_calibrate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hwloop.interference import concurrent_part
from policies.cost import CostModelError, InterferenceModel

SHARES = [(70, 30), (50, 50), (40, 60), (80, 40), (60, 60), (90, 50), (100, 100)]


def synthetic(coef: dict[str, tuple[float, float]], noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Slowdowns from the model's own formula, with Gaussian noise of `noise` (relative) if asked."""
    truth = InterferenceModel(coef)
    rng = np.random.default_rng(seed)
    rows = []
    for phase in coef:
        for p, d in SHARES:
            own, other = (p, d) if phase == "prefill" else (d, p)
            rows.append({"phase": phase, "own_pct": own, "other_pct": other,
                         "slowdown": truth.factor(phase, own, other) * (1 + noise * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_fit_recovers_known_coefficients() -> None:
    coef = {"prefill": (0.10, 0.90), "decode": (0.35, 0.60)}
    fit = InterferenceModel.fit(synthetic(coef))
    for phase, (a, b) in coef.items():
        assert fit.coef[phase] == pytest.approx((a, b), abs=1e-9)
        assert fit.rmse[phase] < 1e-9


def test_fit_with_noise_stays_close() -> None:
    coef = {"decode": (0.35, 0.60)}
    fit = InterferenceModel.fit(pd.concat([synthetic(coef, 0.02, seed) for seed in range(20)]))
    assert fit.coef["decode"] == pytest.approx(coef["decode"], abs=0.05)


def test_fit_never_makes_a_job_faster() -> None:
    """Noise that says 'co-runners help' fits as no interference, not as a speed-up."""
    table = pd.DataFrame({"phase": "decode", "own_pct": [30, 50, 60], "other_pct": [70, 50, 60],
                          "slowdown": [0.97, 0.95, 0.99]})
    fit = InterferenceModel.fit(table)
    assert fit.coef["decode"] == (0.0, 0.0) and fit.factor("decode", 60, 60) == 1.0


def test_factor_formula_and_defaults() -> None:
    m = InterferenceModel({"decode": (0.2, 1.0)})
    assert m.factor("decode", 30, 70) == pytest.approx(1.14)  # fits in 100%: contention only
    assert m.factor("decode", 60, 60) == pytest.approx(1 + 0.12 + 0.2)  # 20% overload
    assert m.factor("decode", 60, 0) == 1.0 and m.factor("prefill", 60, 60) == 1.0
    assert InterferenceModel.none().factor("decode", 50, 100) == 1.0


def test_fit_reads_a_csv_and_names_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "interference.csv"
    synthetic({"prefill": (0.1, 0.5)}).to_csv(path, index=False)
    assert InterferenceModel.from_csv(path).label == "fitted: interference.csv"
    with pytest.raises(CostModelError, match="slowdown"):
        InterferenceModel.fit(pd.DataFrame({"phase": ["decode"], "own_pct": [50], "other_pct": [50]}))
    with pytest.raises(CostModelError, match="not found"):
        InterferenceModel.from_csv(tmp_path / "missing.csv")


def test_concurrent_part_keeps_steps_that_ended_while_the_other_ran() -> None:
    assert concurrent_part([1.0, 1.0, 1.0, 1.0], 2.5) == (1.0, 1.0)
    assert concurrent_part([3.0], 2.5) == ()
