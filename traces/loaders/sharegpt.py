"""ShareGPT: a JSON list of {"id", "conversations": [{"from": "human"|"gpt", "value": text}]}.

The dataset has text but no token counts and no timestamps: tokens are counted here (see
traces.tokens) and arrivals are drawn from a renewal process at the given rate, for one LLM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.loaders._chat import count_tokens, first_exchanges
from traces.loaders._common import (
    Raw,
    drop_empty_lengths,
    existing_file,
    finish,
    read_json_list,
    record_where,
)
from traces.schema import DropLog, Workload, WorkloadError
from traces.synthetic import arrivals_count, seeded
from traces.tokens import token_counter


def load_sharegpt(
    path: str | Path,
    *,
    rate: float,
    model: str = "llm-0",
    seed: int = 0,
    cv: float = 1.0,
    tokenizer: str | None = None,
) -> Workload:
    """One request per conversation (its first human→gpt exchange), in file order, at `rate` req/s.

    Arrivals are Poisson (cv = 1) or Gamma with the given CV, seeded; `tokenizer` is a local
    Hugging Face tokenizer path/name, else token counts are approximate (recorded in meta).
    """
    path = existing_file(path)
    if not rate > 0:
        raise WorkloadError(f"{path}: rate must be > 0 req/s (got {rate})")
    records = read_json_list(path)
    for i, rec in enumerate(records):
        if "conversations" not in rec:
            raise WorkloadError(f"{record_where(path, i)}: missing column conversations")
    df = pd.DataFrame({"conversations": [r["conversations"] for r in records]})
    raw = Raw(path, df.assign(source_row=np.arange(len(df))), "record")
    counter = token_counter(tokenizer)
    drops = DropLog(str(path))
    frame = pd.DataFrame({"pos": np.arange(len(df)), "conversations": df["conversations"]})
    frame = first_exchanges(raw, frame, "conversations", ("from", "value"), ("human", "gpt"), drops)
    frame = drop_empty_lengths(count_tokens(frame, counter), drops)
    frame = frame.assign(
        arrival_s=arrivals_count(seeded(seed), rate, len(frame), cv),
        model=model,
        source_row=frame["pos"],
    ).drop(columns=["pos", "conversations"])
    return finish(
        raw, frame, drops, "sharegpt", tokenizer=counter.name, rate=rate, seed=seed, cv=cv
    )
