"""LMSYS / ChatLMSYS: chat rows with `conversation` [{"role", "content"}], `model` and `tstamp`.

This is the multi-model real trace MuxServe evaluates on (arena logs, whose rows carry a unix
`tstamp`). Read from JSON, JSON Lines or Parquet. LMSYS-Chat-1M itself has no `tstamp`: pass `rate`
to draw arrivals instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.loaders._chat import count_tokens, first_exchanges
from traces.loaders._common import (
    drop_empty_lengths,
    finish,
    map_models,
    read_parquet,
    read_records,
    seconds,
    texts,
)
from traces.schema import DropLog, Workload, WorkloadError
from traces.synthetic import arrivals_count, seeded
from traces.tokens import token_counter

COLUMNS = ("model", "conversation", "tstamp")  # also in the data: conversation_id, turn, language


def load_lmsys(
    path: str | Path,
    *,
    models: dict[str, str] | None = None,
    tokenizer: str | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    condense: float = 1.0,
    rate: float | None = None,
    seed: int = 0,
    cv: float = 1.0,
) -> Workload:
    """One request per conversation (first user→assistant exchange) at its `tstamp`.

    `models` maps trace model names to served LLM names (unmapped models are dropped, counted);
    the window [start_s, end_s) is in seconds since the first tstamp, applied before `condense`
    divides inter-arrival times (MuxServe condensed half a day by 500–2000).
    """
    path = Path(path)
    raw = read_parquet(path) if path.suffix == ".parquet" else read_records(path, COLUMNS)
    raw.require("model", "conversation")
    timed = "tstamp" in raw.df.columns
    if timed == (rate is not None):
        why = (
            "has tstamp, so rate= does not apply"
            if timed
            else "missing column tstamp (pass rate= to draw arrivals)"
        )
        raise WorkloadError(f"{path}: {why}")
    if rate is not None and not rate > 0:
        raise WorkloadError(f"{path}: rate must be > 0 req/s (got {rate})")
    frame = pd.DataFrame(
        {
            "pos": np.arange(len(raw.df)),
            "trace_model": texts(raw, "model"),
            "conversation": raw.df["conversation"].to_numpy(),
            "source_row": raw.df["source_row"].to_numpy(),
        }
    )
    if timed:
        frame["arrival_s"] = seconds(raw, "tstamp")
    counter = token_counter(tokenizer)
    drops = DropLog(str(path))
    frame = map_models(frame, "trace_model", models, drops)
    frame = first_exchanges(
        raw, frame, "conversation", ("role", "content"), ("user", "assistant"), drops
    )
    frame = count_tokens(frame, counter).drop(columns=["pos", "trace_model", "conversation"])
    if not timed:
        frame = drop_empty_lengths(frame, drops)
        assert rate is not None
        frame["arrival_s"] = arrivals_count(seeded(seed), rate, len(frame), cv)
    return finish(
        raw,
        frame,
        drops,
        "lmsys",
        start_s=start_s,
        end_s=end_s,
        condense=condense,
        tokenizer=counter.name,
        models=models,
        **({} if timed else {"rate": rate, "seed": seed, "cv": cv}),
    )
