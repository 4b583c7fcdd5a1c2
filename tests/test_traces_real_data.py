"""Azure and Mooncake loaders on the published files in ../shared/data (skipped where absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from traces import guess_format, load, load_azure, load_mooncake, stats

DATA = Path(__file__).parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(
    not DATA.is_dir(),
    reason=f"reference data folder {DATA} is absent (only on the project's machines)",
)


@pytest.mark.parametrize(
    ("name", "requests", "prompt_mean", "output_mean"),
    [
        ("azure_llm_2023_conv.csv", 19_366, 1155, 211),
        ("azure_llm_2023_code.csv", 8_819, 2048, 28),
    ],
)
def test_azure_2023(name: str, requests: int, prompt_mean: float, output_mean: float) -> None:
    path = DATA / name
    assert guess_format(path) == "azure"
    w = load_azure(path, model="llm-1")
    assert len(w) == requests and w.meta["dropped"] == {}
    assert w.df["prompt_tokens"].mean() == pytest.approx(prompt_mean, abs=1)
    assert w.df["output_tokens"].mean() == pytest.approx(output_mean, abs=1)
    assert w.df["arrival_s"].iloc[0] == 0.0
    assert 3400 < w.duration_s < 3600  # about one hour
    assert (w.df["source_row"] == np.arange(2, requests + 2)).all()  # the file is in time order
    assert w.models == ["llm-1"]


def test_azure_conv_first_gap_matches_the_file() -> None:
    w = load(DATA / "azure_llm_2023_conv.csv")
    # 18:15:46.6805900 -> 18:15:50.9951690
    assert w.df["arrival_s"].iloc[1] == pytest.approx(4.314579, abs=1e-6)
    assert stats(w).iloc[0]["rate_rps"] == pytest.approx(5.5, abs=0.1)


def test_mooncake_conversation() -> None:
    path = DATA / "mooncake_conversation_trace.jsonl"
    assert guess_format(path) == "mooncake"
    w = load_mooncake(path)
    assert len(w) == 12_031 and w.meta["dropped"] == {}
    with path.open() as f:
        raw = [json.loads(line) for line in f]
    ms = np.array([r["timestamp"] for r in raw], dtype=np.float64)
    np.testing.assert_allclose(w.df["arrival_s"].to_numpy(), np.sort(ms - ms.min()) / 1000.0)
    assert w.df["prompt_tokens"].sum() == sum(r["input_length"] for r in raw)
    assert w.df["output_tokens"].sum() == sum(r["output_length"] for r in raw)


def test_condensed_real_trace_runs_faster() -> None:
    w = load(DATA / "mooncake_conversation_trace.jsonl", start_s=0, end_s=600, condense=10)
    assert w.duration_s < 60.0
    assert w.meta["dropped"]["outside the window [0, 600) s"] > 0
