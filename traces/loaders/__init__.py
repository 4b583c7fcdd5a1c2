"""Loaders for published trace formats, read as they are published, and a dispatcher `load`.

Each loader turns one format into a validated Workload. Malformed input fails with one line that
names the file, the line/record/row and the column; rows that are valid but unusable (failed
requests, unmapped models, empty turns) are dropped with a logged count, recorded in meta["dropped"].
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traces.loaders._common import existing_file
from traces.loaders.azure import load_azure
from traces.loaders.burstgpt import load_burstgpt
from traces.loaders.lmsys import load_lmsys
from traces.loaders.mooncake import load_mooncake
from traces.loaders.muxserve_yaml import load_muxserve_yaml, read_muxserve_yaml
from traces.loaders.sharegpt import load_sharegpt
from traces.schema import REQUIRED_COLUMNS, Workload, WorkloadError

FORMATS: dict[str, Callable[..., Workload]] = {
    "workload": Workload.read,  # muxsim's own Parquet/CSV, as written by Workload.write
    "sharegpt": load_sharegpt,
    "lmsys": load_lmsys,
    "azure": load_azure,
    "mooncake": load_mooncake,
    "burstgpt": load_burstgpt,
    "muxserve-yaml": load_muxserve_yaml,
}

# Keys that identify a JSON format from the first few kilobytes, checked in this order
# ("conversations" before "conversation", which it contains).
_JSON_KEYS = (
    ("sharegpt", "conversations"),
    ("lmsys", "conversation"),
    ("mooncake", "input_length"),
)


def _format_of_columns(columns: set[str]) -> str | None:
    if set(REQUIRED_COLUMNS) <= columns:
        return "workload"
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= columns:
        return "azure"
    if {"Timestamp", "Model", "Request tokens", "Response tokens"} <= columns:
        return "burstgpt"
    if "conversation" in columns:
        return "lmsys"
    return None


def guess_format(path: str | Path) -> str:
    """The format name for `path`, from its extension and its first bytes (never the whole file)."""
    path = existing_file(path)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "muxserve-yaml"
    fmt: str | None = None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            fmt = _format_of_columns(set(pq.read_schema(path).names))
        except Exception:  # not Parquet after all: reported as unknown below
            fmt = None
    else:
        with path.open("rb") as f:
            head = f.read(65536).decode("utf-8", errors="replace")
        if suffix == ".csv":
            header = next(iter(head.splitlines()), "")
            fmt = _format_of_columns({c.strip() for c in header.split(",")})
        elif head.lstrip()[:1] in ("[", "{"):
            fmt = next((f for f, key in _JSON_KEYS if re.search(rf'"{key}"\s*:', head)), None)
    if fmt is None:
        raise WorkloadError(
            f"{path}: unknown format (cannot tell from its extension {suffix or '(none)'!r} and first "
            f"bytes; pass format= one of {', '.join(FORMATS)})"
        )
    return fmt


def load(path: str | Path, format: str | None = None, **options: Any) -> Workload:
    """Load any supported trace; `format` is guessed when None; `options` go to that loader."""
    fmt = format or guess_format(path)
    check_options(fmt, options, str(path))
    return FORMATS[fmt](path, **options)


def check_options(fmt: str, options: dict[str, Any], source: str = "") -> None:
    """Refuse an unknown format, options its loader does not take, or missing required ones: what
    can be said before the file is read. `source` prefixes the message (the file)."""
    where = f"{source}: " if source else ""
    loader = FORMATS.get(fmt)
    if loader is None:
        raise WorkloadError(f"{where}unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    params = inspect.signature(loader).parameters
    unknown = sorted(set(options) - set(params) | set(options) & {"path", "cls"})
    if unknown:
        takes = ", ".join(p for p in params if p not in ("path", "cls")) or "no options"
        raise WorkloadError(f"{where}format {fmt} does not take {', '.join(unknown)} (it takes: {takes})")
    missing = [
        p.name
        for p in params.values()
        if p.default is p.empty and p.kind is p.KEYWORD_ONLY and p.name not in options
    ]
    if missing:
        raise WorkloadError(f"{where}format {fmt} needs option(s) {', '.join(missing)}")


def parse_models(text: str) -> dict[str, str]:
    """'vicuna-13b=llm-0,koala-13b=llm-1' or a JSON object → a trace-name → LLM-name mapping."""
    text = text.strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"model mapping: not valid JSON ({e.msg})") from None
        if not isinstance(mapping, dict):
            raise WorkloadError("model mapping: expected a JSON object")
        return {str(k): str(v) for k, v in mapping.items()}
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    bad = next((p for p in pairs if len(p) != 2 or not p[0].strip() or not p[1].strip()), None)
    if bad is not None or not pairs:
        raise WorkloadError(
            f"model mapping: expected trace=llm pairs separated by commas, got {text!r}"
        )
    return {k.strip(): v.strip() for k, v in pairs}


__all__ = [
    "FORMATS",
    "check_options",
    "guess_format",
    "load",
    "load_azure",
    "load_burstgpt",
    "load_lmsys",
    "load_mooncake",
    "load_muxserve_yaml",
    "load_sharegpt",
    "parse_models",
    "read_muxserve_yaml",
]
