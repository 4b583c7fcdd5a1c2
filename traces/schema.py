"""The Workload table: the one shape every trace source is turned into.

Everything downstream (placement, simulator, hardware runner) reads only this table, so a new trace
format is one loader and nothing else. Validation happens on the way in, once, and fails with a
single line that names the source and the offending row or column, because a silently repaired
trace gives silently wrong throughput numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REQUIRED_COLUMNS: tuple[str, ...] = (
    "request_id",
    "model",
    "arrival_s",
    "prompt_tokens",
    "output_tokens",
)
INT_COLUMNS = ("request_id", "prompt_tokens", "output_tokens")
# Optional, checked when present: the model type of a served LLM instance ("llama-7b"), which the
# cost model is keyed by, and the line/record of the source file a request came from (provenance).
OPTIONAL_COLUMNS: tuple[str, ...] = ("model_type", "source_row")


logger = logging.getLogger("traces")


class WorkloadError(ValueError):
    """A trace that cannot become a valid Workload. The message is one line naming source and field."""


@dataclass
class DropLog:
    """Counts of requests dropped per reason, each drop logged: nothing disappears unreported.

    The counts end up in Workload.meta["dropped"] so a result can always be traced back to how
    much of the source trace it actually used.
    """

    source: str
    counts: dict[str, int] = field(default_factory=dict)

    def drop(self, df: pd.DataFrame, mask: np.ndarray | pd.Series, reason: str) -> pd.DataFrame:
        """`df` without the rows where `mask` is true; a WARNING says how many and why."""
        mask = np.asarray(mask, dtype=bool)
        n = int(mask.sum())
        if n:
            logger.warning("%s: dropped %d of %d requests: %s", self.source, n, len(df), reason)
            self.counts[reason] = self.counts.get(reason, 0) + n
        return df.loc[~mask]

    def merged_into(self, meta: dict[str, Any]) -> dict[str, int]:
        """The counts of an earlier step (meta["dropped"]) plus this log's, for the new metadata."""
        total = dict(meta.get("dropped", {}))
        for reason, n in self.counts.items():
            total[reason] = total.get(reason, 0) + n
        return total


@dataclass
class Workload:
    """One row per request, sorted by arrival; `meta` records provenance (source, tokenizer, seed)."""

    df: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.df = validate(self.df, source=str(self.meta.get("source", "<workload>")))

    def __len__(self) -> int:
        return len(self.df)

    @property
    def models(self) -> list[str]:
        """Served LLM names in order of first appearance (stable, so seeds give stable results)."""
        return [str(m) for m in self.df["model"].unique()]  # pandas keeps the order of appearance

    @property
    def duration_s(self) -> float:
        if self.df.empty:
            return 0.0
        return float(self.df["arrival_s"].iloc[-1] - self.df["arrival_s"].iloc[0])

    def rates(self) -> dict[str, float]:
        """Mean request rate per model over the whole trace span (req/s).

        A workload whose requests all arrive at one instant has no rate; any number given for it
        (one request "per nanosecond") would drive placement to nonsense, so it is refused.
        """
        span = self.duration_s
        if span <= 0:
            raise WorkloadError(
                f"{self.meta.get('source', '<workload>')}: its {len(self)} request(s) all arrive at "
                f"{self.df['arrival_s'].iloc[0]:g} s, so it has no request rate (a rate needs at least "
                "two distinct arrival times)"
            )
        counts = self.df["model"].value_counts()
        return {m: float(counts[m]) / span for m in self.models}

    def mean_lengths(self) -> dict[str, tuple[float, float]]:
        """(mean prompt, mean output) tokens per model: placement uses the workload's own lengths."""
        g = self.df.groupby("model", sort=False)[["prompt_tokens", "output_tokens"]].mean()
        return {m: (float(r.prompt_tokens), float(r.output_tokens)) for m, r in g.iterrows()}

    def with_frame(self, df: pd.DataFrame, **meta: Any) -> Workload:
        """A new Workload over `df`, carrying this one's metadata plus `meta`."""
        return Workload(df.reset_index(drop=True), {**self.meta, **meta})

    def write(self, path: str | Path) -> Path:
        """Write as Parquet (metadata kept in the file) or CSV (metadata in a .meta.json sidecar)."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(self.df, preserve_index=False)
            md = dict(table.schema.metadata or {})
            md[b"muxsim.meta"] = json.dumps(self.meta, default=str).encode()
            pq.write_table(table.replace_schema_metadata(md), path)
        elif path.suffix == ".csv":
            self.df.to_csv(path, index=False)
            path.with_suffix(".meta.json").write_text(json.dumps(self.meta, default=str, indent=2))
        else:
            raise WorkloadError(
                f"{path}: unknown workload format {path.suffix!r} (use .parquet or .csv)"
            )
        return path

    @classmethod
    def read(cls, path: str | Path) -> Workload:
        """Read a Workload written by `write` (Parquet or CSV)."""
        import json

        path = Path(path)
        if not path.exists():
            raise WorkloadError(f"{path}: file not found")
        meta: dict[str, Any] = {}
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise WorkloadError(f"{path}: not a readable Parquet file ({e})") from None
            raw = (table.schema.metadata or {}).get(b"muxsim.meta")
            meta = json.loads(raw) if raw else {}
            df = table.to_pandas()
        elif path.suffix == ".csv":
            try:  # blank lines kept as empty rows, so row i is line i + 2 as an editor counts
                df = pd.read_csv(path, skip_blank_lines=False)
            except pd.errors.EmptyDataError:
                raise WorkloadError(f"{path}: empty file") from None
            except (pd.errors.ParserError, UnicodeDecodeError) as e:
                raise WorkloadError(f"{path}: not a readable CSV ({str(e).strip().splitlines()[0]})") from None
            filled = np.flatnonzero(df.notna().any(axis=1).to_numpy())
            df = df.iloc[: filled[-1] + 1 if filled.size else 0]  # trailing newlines are not requests
            validate(df, str(path), where=lambda i: f"line {i + 2}")
            side = path.with_suffix(".meta.json")
            try:
                meta = json.loads(side.read_text()) if side.exists() else {}
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{side}: line {e.lineno}: not valid JSON ({e.msg})") from None
        else:
            raise WorkloadError(
                f"{path}: unknown workload format {path.suffix!r} (use .parquet or .csv)"
            )
        meta["source"] = str(path)
        return cls(df, meta)


def validate(
    df: pd.DataFrame, source: str = "<workload>", where: Callable[[int], str] = lambda i: f"row {i}"
) -> pd.DataFrame:
    """Check the schema and return the frame with canonical dtypes; raise WorkloadError otherwise.

    `where(i)` names positional row i in messages: "row i" of a table, or the file line of a CSV.
    """
    if df.empty:
        raise WorkloadError(f"{source}: empty workload (no requests)")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise WorkloadError(f"{source}: missing column(s) {', '.join(missing)}")
    for col in REQUIRED_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in df.columns):
        bad = df[col].isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise WorkloadError(f"{source}: {where(row)}: column {col} is NaN/empty")
    out = df.copy()
    for col in INT_COLUMNS:
        values = pd.to_numeric(out[col], errors="coerce")
        bad = values.isna().to_numpy() | (values.to_numpy() != np.floor(values.to_numpy()))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise WorkloadError(
                f"{source}: {where(row)}: column {col} is not an integer ({out[col].iloc[row]!r})"
            )
        out[col] = values.astype(np.int64)
    arrival = pd.to_numeric(out["arrival_s"], errors="coerce")
    if arrival.isna().any():
        row = int(np.flatnonzero(arrival.isna().to_numpy())[0])
        raise WorkloadError(
            f"{source}: {where(row)}: column arrival_s is not a number ({out['arrival_s'].iloc[row]!r})"
        )
    out["arrival_s"] = arrival.astype(np.float64)
    out["model"] = out["model"].astype(str)
    if "model_type" in out.columns:
        out["model_type"] = out["model_type"].astype(str)
    for col in ("prompt_tokens", "output_tokens"):
        bad = (out[col] <= 0).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise WorkloadError(
                f"{source}: {where(row)}: column {col} must be > 0 (got {out[col].iloc[row]})"
            )
    if (out["arrival_s"] < 0).any():
        row = int(np.flatnonzero((out["arrival_s"] < 0).to_numpy())[0])
        raise WorkloadError(f"{source}: {where(row)}: column arrival_s is negative")
    dec = np.flatnonzero(np.diff(out["arrival_s"].to_numpy()) < 0)
    if dec.size:
        raise WorkloadError(
            f"{source}: {where(int(dec[0]) + 1)}: column arrival_s is not sorted (arrives before {where(int(dec[0]))})"
        )
    dup = out["request_id"].duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise WorkloadError(
            f"{source}: {where(row)}: duplicate request_id {out['request_id'].iloc[row]}"
        )
    return out.reset_index(drop=True)
