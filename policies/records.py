"""Request records: the one output schema of both executors, streamed to Parquet.

The simulator and the hardware runner write the same rows, so one metrics module compares them.
Rows are flushed in chunks, so memory does not grow with the trace and an interrupted run still
leaves every record written so far on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

RECORD_SCHEMA = pa.schema([
    ("request_id", pa.int64()),
    ("model", pa.string()),  # served LLM name
    ("unit", pa.int64()),  # -1 when the LLM is on no unit
    ("arrival_s", pa.float64()),
    ("first_token_s", pa.float64()),  # NaN when no token was produced
    ("finish_s", pa.float64()),  # NaN unless finished
    ("prompt_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("preemptions", pa.int64()),
    ("status", pa.string()),  # "finished" or "failed"
    ("reason", pa.string()),  # why it failed; "" when finished
])
RECORD_COLUMNS = tuple(RECORD_SCHEMA.names)


class RecordWriter:
    """Collects records; with a path, appends them to a Parquet file every `flush_every` rows."""

    def __init__(self, path: str | Path | None = None, flush_every: int = 65536) -> None:
        self.path = Path(path) if path else None
        self.flush_every = flush_every
        self._rows: list[tuple[Any, ...]] = []  # one tuple per record: cheaper to add than 11 appends
        self._tables: list[pa.Table] = []
        self._writer: pq.ParquetWriter | None = None
        self.count = 0

    def add(self, request_id: int, model: str, unit: int, arrival_s: float, first_token_s: float,
            finish_s: float, prompt_tokens: int, output_tokens: int, preemptions: int,
            status: str, reason: str = "") -> None:
        self._rows.append((request_id, model, unit, arrival_s, first_token_s, finish_s, prompt_tokens,
                           output_tokens, preemptions, status, reason))
        self.count += 1
        if len(self._rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        columns = dict(zip(RECORD_COLUMNS, map(list, zip(*self._rows, strict=True)), strict=True))
        self._rows = []
        table = pa.Table.from_pydict(columns, schema=RECORD_SCHEMA)
        if self.path is None:
            self._tables.append(table)
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, RECORD_SCHEMA)
        self._writer.write_table(table)

    def close(self) -> pd.DataFrame | None:
        """Flush and finish the file; without a path, return all records as a DataFrame."""
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.path is None:
            tables = self._tables or [RECORD_SCHEMA.empty_table()]
            return pa.concat_tables(tables).to_pandas()
        return None


def read_records(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()
