"""Azure LLM inference traces (Splitwise 2023, DynamoLLM 2024): one model, real arrivals.

Columns TIMESTAMP, ContextTokens, GeneratedTokens in both releases; the timestamp format differs
(2023: "2023-11-16 18:15:46.6805900", 2024: "2024-05-10 00:00:00.009930+00:00"), and both parse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.loaders._common import datetime_seconds, finish, numbers, read_csv
from traces.schema import DropLog, Workload


def load_azure(
    path: str | Path,
    *,
    model: str = "llm-0",
    start_s: float | None = None,
    end_s: float | None = None,
    condense: float = 1.0,
) -> Workload:
    """Arrival = seconds since the first TIMESTAMP; all requests go to the LLM named `model`."""
    raw = read_csv(path)
    raw.require("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    frame = pd.DataFrame(
        {
            "arrival_s": datetime_seconds(raw, "TIMESTAMP"),
            "prompt_tokens": numbers(raw, "ContextTokens").astype(np.int64),
            "output_tokens": numbers(raw, "GeneratedTokens").astype(np.int64),
            "model": model,
            "source_row": raw.df["source_row"].to_numpy(),
        }
    )
    drops = DropLog(str(raw.path))
    return finish(raw, frame, drops, "azure", start_s=start_s, end_s=end_s, condense=condense)
