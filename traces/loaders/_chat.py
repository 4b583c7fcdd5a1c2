"""The part of ShareGPT and LMSYS loading that is the same: conversations in, token counts out.

Both are chat logs without token counts. One request per conversation: its first exchange (the
first user turn is the prompt, the first model reply the output), as in vLLM's and MuxServe's
ShareGPT sampling. Later turns are not replayed, since their prompts would depend on a context
policy the trace does not record.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from traces.loaders._common import Raw
from traces.schema import DropLog, WorkloadError
from traces.tokens import TokenCounter


def _turns(raw: Raw, i: int, column: str, conversation: Any, keys: tuple[str, str]) -> list[Any]:
    """The conversation as a list, refusing anything that is not a list of {role, text} objects."""
    if not isinstance(conversation, list | tuple | np.ndarray):
        raise WorkloadError(f"{raw.where(i)}: column {column} is not a list of messages")
    for j, turn in enumerate(conversation[:2]):
        if not isinstance(turn, dict) or any(k not in turn for k in keys):
            raise WorkloadError(
                f"{raw.where(i)}: column {column}: message {j} needs keys {keys[0]!r} and {keys[1]!r}"
            )
    return list(conversation)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def first_exchanges(
    raw: Raw,
    frame: pd.DataFrame,
    column: str,
    keys: tuple[str, str],
    roles: tuple[str, str],
    drops: DropLog,
) -> pd.DataFrame:
    """`frame` plus prompt_text/output_text; conversations that do not open asker→answerer are dropped.

    `frame` must keep raw's positional index (column `pos`) so errors point at the source row.
    """
    role_key, text_key = keys
    prompt, output, reason = [], [], []
    for pos, conversation in zip(frame["pos"], frame[column], strict=True):
        turns = _turns(raw, int(pos), column, conversation, keys)
        if len(turns) < 2:
            reason.append("fewer than 2 turns")
        elif (turns[0][role_key], turns[1][role_key]) != roles:
            reason.append(f"first two turns are not {roles[0]}→{roles[1]}")
        else:
            reason.append("")
        prompt.append(_text(turns[0][text_key]) if turns else "")
        output.append(_text(turns[1][text_key]) if len(turns) > 1 else "")
    frame = frame.assign(prompt_text=prompt, output_text=output, reason=reason)
    for why in dict.fromkeys(r for r in reason if r):
        frame = drops.drop(frame, frame["reason"].to_numpy() == why, why)
    return frame.drop(columns="reason")


def count_tokens(frame: pd.DataFrame, counter: TokenCounter) -> pd.DataFrame:
    """Replace the texts by token counts (the texts are not needed downstream and are large)."""
    return frame.assign(
        prompt_tokens=counter.count(frame["prompt_text"].tolist()),
        output_tokens=counter.count(frame["output_text"].tolist()),
    ).drop(columns=["prompt_text", "output_text"])
