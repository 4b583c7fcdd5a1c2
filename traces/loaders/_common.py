"""Reading and checking helpers shared by the format loaders.

Every raw frame a loader builds carries a `source_row` column (the file line, JSON record or
Parquet row each request came from), so every error can point at the exact place in the file and
the finished Workload keeps that provenance.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from traces import ops
from traces.schema import REQUIRED_COLUMNS, DropLog, Workload, WorkloadError


@dataclass(frozen=True)
class Raw:
    """A frame read from `path`, whose rows are numbered in `unit`s ("line", "record", "row")."""

    path: Path
    df: pd.DataFrame
    unit: str

    def where(self, i: int) -> str:
        """'<file>: line 17' for positional row i of df."""
        row = self.df["source_row"].iat[i]
        return record_where(self.path, int(row)) if self.unit == "record" else f"{self.path}: {self.unit} {row}"

    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.df.columns]
        if missing:
            have = ", ".join(map(str, self.df.columns.drop("source_row", errors="ignore")))
            raise WorkloadError(
                f"{self.path}: missing column(s) {', '.join(missing)} (found: {have})"
            )


def record_where(path: Path, k: int) -> str:
    """'<file>: record k (line n)': record k (0-based) of a JSON list, and the line it starts on, as an
    editor counts (for error messages only: the file is scanned up to that record)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    i = text.find("[") + 1
    try:
        for n in range(k + 1):
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if n < k:
                i = decoder.raw_decode(text, i)[1]
    except json.JSONDecodeError:
        return f"{path}: record {k}"
    return f"{path}: record {k} (line {text.count(chr(10), 0, i) + 1})"


def existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise WorkloadError(f"{path}: empty file")
    return path


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_csv(path: str | Path) -> Raw:
    """A CSV with file line numbers; blank lines are kept as empty rows so numbers stay exact."""
    path = existing_file(path)
    try:
        df = pd.read_csv(path, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise WorkloadError(f"{path}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise WorkloadError(f"{path}: not a readable CSV ({_first_line(e)})") from None
    df.columns = [str(c).strip() for c in df.columns]
    # Trailing newlines parse as empty rows; they are not requests.
    filled = np.flatnonzero(df.notna().any(axis=1).to_numpy())
    df = df.iloc[: filled[-1] + 1 if filled.size else 0].copy()
    if df.empty:
        raise WorkloadError(f"{path}: empty file (header only)")
    df["source_row"] = np.arange(2, len(df) + 2)  # line 1 is the header
    return Raw(path, df, "line")


def _frame(records: list[dict[str, Any]], rows: Iterable[int], keys: Iterable[str]) -> pd.DataFrame:
    """Only the wanted keys; a key absent from every record becomes a missing column."""
    df = pd.DataFrame(
        {k: [r.get(k) for r in records] for k in keys if any(k in r for r in records)}
    )
    df["source_row"] = list(rows)
    return df


def read_records(path: str | Path, keys: Iterable[str]) -> Raw:
    """JSON objects from a JSON list ("record i", 0-based) or JSON Lines ("line n"), as a frame."""
    path = existing_file(path)
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        records = read_json_list(path)
        return Raw(path, _frame(records, range(len(records)), keys), "record")
    records, lines = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise WorkloadError(
                    f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            records.append(obj)
            lines.append(lineno)
    if not records:
        raise WorkloadError(f"{path}: empty file (no JSON records)")
    return Raw(path, _frame(records, lines, keys), "line")


def read_json_list(path: Path) -> list[dict[str, Any]]:
    """A JSON file holding a list of objects (ShareGPT, some LMSYS dumps)."""
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise WorkloadError(
            f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})"
        ) from None
    except UnicodeDecodeError as e:
        raise WorkloadError(f"{path}: not UTF-8 text ({_first_line(e)})") from None
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise WorkloadError(f"{path}: empty file (no JSON records)")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise WorkloadError(
                f"{record_where(path, i)}: expected a JSON object, got {type(rec).__name__}"
            )
    return data


def read_parquet(path: str | Path) -> Raw:
    path = existing_file(path)
    try:
        import pyarrow.parquet as pq

        df = pq.read_table(path).to_pandas()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise WorkloadError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    if df.empty:
        raise WorkloadError(f"{path}: empty file (no rows)")
    df["source_row"] = np.arange(len(df))
    return Raw(path, df, "row")


def _fail(raw: Raw, col: str, bad: np.ndarray, problem: str) -> NoReturn:
    """Raise for the first row where `bad` is true (the caller knows there is one)."""
    i = int(np.flatnonzero(bad)[0])
    value = raw.df[col].iat[i]
    if isinstance(value, np.generic):  # show -3, not np.int64(-3)
        value = value.item()
    shown = "" if _is_blank(value) else f" ({value!r})"
    raise WorkloadError(f"{raw.where(i)}: column {col} {problem}{shown}")


def _check(raw: Raw, col: str, bad: np.ndarray, problem: str) -> None:
    if bad.any():
        _fail(raw, col, bad, problem)


def _is_blank(value: Any) -> bool:
    return (
        value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""
    )


def texts(raw: Raw, col: str) -> np.ndarray:
    """A text column (model names, ids) as strings, refusing blanks."""
    column = raw.df[col]
    blank = np.fromiter((_is_blank(v) for v in column), dtype=bool, count=len(column))
    _check(raw, col, blank, "is empty")
    return column.astype(str).to_numpy(dtype=object)


def numbers(raw: Raw, col: str, *, integer: bool = True, signed: bool = False) -> np.ndarray:
    """A numeric column as float64, refusing blanks, text, fractions (if integer), negatives (unless signed)."""
    values = pd.to_numeric(raw.df[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    nan = ~np.isfinite(values)
    if nan.any():
        first = int(np.flatnonzero(nan)[0])
        what = "is empty" if _is_blank(raw.df[col].iat[first]) else "is not a number"
        _fail(raw, col, nan, what)
    if not signed:
        _check(raw, col, values < 0, "is negative")
    if integer:
        _check(raw, col, values != np.floor(values), "is not an integer")
    return values


def seconds(raw: Raw, col: str, per_unit: float = 1.0) -> np.ndarray:
    """Numeric timestamps (in units of `per_unit` seconds) as seconds since the earliest one."""
    values = numbers(raw, col, integer=False, signed=True)
    return (values - values.min()) * per_unit


def datetime_seconds(raw: Raw, col: str) -> np.ndarray:
    """ISO 8601 date-time strings as seconds since the earliest one.

    ISO 8601 covers Azure 2023 ("2023-11-16 18:15:46.6805900", 7 fractional digits, no zone) and
    Azure 2024 ("2024-05-10 00:00:00.009930+00:00"); values without a zone are taken as UTC.
    """
    column = raw.df[col]
    stamps = pd.to_datetime(column.astype(str), format="ISO8601", utc=True, errors="coerce")
    bad = stamps.isna().to_numpy()
    if bad.any():
        blank = np.fromiter((_is_blank(v) for v in column), dtype=bool, count=len(column))
        _check(raw, col, blank, "is empty")
        _fail(raw, col, bad, "is not an ISO 8601 date-time")
    return (stamps - stamps.min()).dt.total_seconds().to_numpy(dtype=np.float64)


def drop_empty_lengths(frame: pd.DataFrame, drops: DropLog) -> pd.DataFrame:
    """Zero-token prompts or outputs are failed or empty requests: the Workload refuses them."""
    frame = drops.drop(frame, frame["prompt_tokens"].to_numpy() == 0, "prompt of 0 tokens")
    return drops.drop(frame, frame["output_tokens"].to_numpy() == 0, "output of 0 tokens")


def finish(
    raw: Raw,
    frame: pd.DataFrame,
    drops: DropLog,
    fmt: str,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
    condense: float = 1.0,
    **meta: Any,
) -> Workload:
    """Sort, number and validate a loader's frame; then cut the time window and condense time.

    `frame` needs arrival_s (seconds since the trace's first timestamp), prompt_tokens,
    output_tokens, model and source_row. The window is in those original seconds and is applied
    before `condense` divides every arrival time.
    """
    frame = drop_empty_lengths(frame, drops)
    if frame.empty:
        raise WorkloadError(f"{raw.path}: no requests left after dropping {_reasons(drops)}")
    frame = frame.sort_values("arrival_s", kind="stable")
    frame["request_id"] = np.arange(len(frame), dtype=np.int64)
    frame = frame[[*REQUIRED_COLUMNS, *(c for c in frame.columns if c not in REQUIRED_COLUMNS)]]
    workload = Workload(
        frame.reset_index(drop=True),
        {
            "source": str(raw.path),
            "format": fmt,
            "source_row": raw.unit,
            "rows_read": len(raw.df),
            "dropped": dict(drops.counts),
            **meta,
        },
    )
    if start_s is not None or end_s is not None:
        workload = ops.window(workload, start_s, end_s)
    if condense != 1.0:
        workload = ops.rescale_rate(workload, condense)
    return workload


def _reasons(drops: DropLog) -> str:
    return "; ".join(f"{n} × {reason}" for reason, n in drops.counts.items()) or "nothing"


def map_models(
    frame: pd.DataFrame, column: str, models: dict[str, str] | None, drops: DropLog
) -> pd.DataFrame:
    """Rename trace model names to served LLM names; rows of unmapped models are dropped, counted."""
    names = frame[column].astype(str)
    if models is None:
        return frame.assign(model=names)
    unmapped = ~names.isin(list(models)).to_numpy()
    if unmapped.any():
        counts = names[unmapped].value_counts()
        shown = ", ".join(f"{m} ×{n}" for m, n in counts.head(5).items())
        more = f", and {len(counts) - 5} more" if len(counts) > 5 else ""
        frame = drops.drop(frame, unmapped, f"model not in the mapping: {shown}{more}")
    return frame.assign(model=frame[column].astype(str).map(models))
