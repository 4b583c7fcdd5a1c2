"""BurstGPT (Azure OpenAI GPT service logs): CSV with Timestamp (s), Model, token counts.

Rows with 0 response tokens are failed requests in BurstGPT's own convention; they never reach a
model's decode phase, so they are dropped, with a logged count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.loaders._common import finish, map_models, numbers, read_csv, seconds, texts
from traces.schema import DropLog, Workload


def load_burstgpt(
    path: str | Path,
    *,
    models: dict[str, str] | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    condense: float = 1.0,
) -> Workload:
    """`models` maps trace names ("ChatGPT", "GPT-4") to served LLM names; None keeps the names."""
    raw = read_csv(path)
    raw.require("Timestamp", "Model", "Request tokens", "Response tokens")
    frame = pd.DataFrame(
        {
            "arrival_s": seconds(raw, "Timestamp"),
            "prompt_tokens": numbers(raw, "Request tokens").astype(np.int64),
            "output_tokens": numbers(raw, "Response tokens").astype(np.int64),
            "trace_model": texts(raw, "Model"),
            "source_row": raw.df["source_row"].to_numpy(),
        }
    )
    drops = DropLog(str(raw.path))
    frame = drops.drop(
        frame, frame["output_tokens"].to_numpy() == 0, "failed request (0 response tokens)"
    )
    frame = map_models(frame, "trace_model", models, drops).drop(columns="trace_model")
    return finish(
        raw,
        frame,
        drops,
        "burstgpt",
        start_s=start_s,
        end_s=end_s,
        condense=condense,
        models=models,
    )
