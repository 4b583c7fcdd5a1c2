"""Mooncake traces (FAST 2025): JSON Lines with timestamp (ms), input_length, output_length.

`hash_ids` (the 512-token prefix blocks, for prefix caching) are not used by muxsim and are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.loaders._common import finish, numbers, read_records, seconds
from traces.schema import DropLog, Workload


def load_mooncake(
    path: str | Path,
    *,
    model: str = "llm-0",
    start_s: float | None = None,
    end_s: float | None = None,
    condense: float = 1.0,
) -> Workload:
    """Arrival = (timestamp − first timestamp) / 1000; all requests go to the LLM named `model`."""
    raw = read_records(path, ("timestamp", "input_length", "output_length"))
    raw.require("timestamp", "input_length", "output_length")
    frame = pd.DataFrame(
        {
            "arrival_s": seconds(raw, "timestamp", per_unit=1e-3),
            "prompt_tokens": numbers(raw, "input_length").astype(np.int64),
            "output_tokens": numbers(raw, "output_length").astype(np.int64),
            "model": model,
            "source_row": raw.df["source_row"].to_numpy(),
        }
    )
    drops = DropLog(str(raw.path))
    return finish(raw, frame, drops, "mooncake", start_s=start_s, end_s=end_s, condense=condense)
