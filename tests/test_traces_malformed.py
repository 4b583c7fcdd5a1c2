"""Property tests: a corrupted cell anywhere gives the promised one-line error, never a crash.

The message must name the file, the line and the column, so a user can fix the file directly.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces import WorkloadError, load_azure, load_burstgpt, load_mooncake
from traces.schema import Workload

# A cell value that is not a valid token count, and the words the error must use for it.
BAD_COUNTS = {
    "": "is empty",
    "abc": "is not a number",
    "-5": "is negative",
    "1.5": "is not an integer",
}
BAD_DATES = {"": "is empty", "yesterday": "is not an ISO 8601 date-time"}
BAD_SECONDS = {"": "is empty", "yesterday": "is not a number"}

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = (
    "Timestamp",
    "Model",
    "Request tokens",
    "Response tokens",
    "Total tokens",
    "Log Type",
)


def azure_row(i: int) -> list[str]:
    return [f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.6805900", str(100 + i), str(10 + i)]


def burstgpt_row(i: int) -> list[str]:
    return [str(3 * i), "ChatGPT", str(100 + i), str(10 + i), str(110 + 2 * i), "Conversation log"]


CSV_FORMATS: dict[
    str,
    tuple[
        tuple[str, ...],
        Callable[[int], list[str]],
        Callable[[Path], Workload],
        dict[str, dict[str, str]],
    ],
] = {
    "azure": (
        AZURE_COLUMNS,
        azure_row,
        load_azure,
        {"TIMESTAMP": BAD_DATES, "ContextTokens": BAD_COUNTS, "GeneratedTokens": BAD_COUNTS},
    ),
    "burstgpt": (
        BURSTGPT_COLUMNS,
        burstgpt_row,
        load_burstgpt,
        {
            "Timestamp": BAD_SECONDS,
            "Request tokens": BAD_COUNTS,
            "Response tokens": BAD_COUNTS,
            "Model": {"": "is empty"},
        },
    ),
}


@st.composite
def corrupted_csv(draw: st.DrawFn) -> tuple[str, int, str, str, str]:
    """(format, row, column, bad value, expected wording) for one corrupted cell."""
    fmt = draw(st.sampled_from(sorted(CSV_FORMATS)))
    n_rows = draw(st.integers(1, 30))
    row = draw(st.integers(0, n_rows - 1))
    column = draw(st.sampled_from(sorted(CSV_FORMATS[fmt][3])))
    value, wording = draw(st.sampled_from(sorted(CSV_FORMATS[fmt][3][column].items())))
    return fmt, n_rows, row, column, value, wording


@settings(max_examples=40, deadline=None)
@given(case=corrupted_csv())
def test_csv_loaders_name_file_line_and_column(case: tuple[str, int, int, str, str, str]) -> None:
    fmt, n_rows, row, column, value, wording = case
    columns, make_row, loader, _ = CSV_FORMATS[fmt]
    rows = [make_row(i) for i in range(n_rows)]
    rows[row][columns.index(column)] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{fmt}.csv"
        path.write_text(",".join(columns) + "\n" + "".join(",".join(r) + "\n" for r in rows))
        with pytest.raises(WorkloadError) as e:
            loader(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line {row + 2}: column {column} {wording}"), message


BAD_JSON_COUNTS = {
    None: "is empty",
    "abc": "is not a number",
    -5: "is negative",
    1.5: "is not an integer",
}
MOONCAKE_BAD = {
    "timestamp": {
        None: "is empty",
        "abc": "is not a number",
    },  # negative or fractional times are valid
    "input_length": BAD_JSON_COUNTS,
    "output_length": BAD_JSON_COUNTS,
}


@st.composite
def corrupted_jsonl(draw: st.DrawFn) -> tuple[int, int, str, object, str]:
    """(rows, row, key, bad value, expected wording) for one corrupted Mooncake value."""
    n_rows = draw(st.integers(1, 20))
    row = draw(st.integers(0, n_rows - 1))
    column = draw(st.sampled_from(sorted(MOONCAKE_BAD)))
    value, wording = draw(st.sampled_from(sorted(MOONCAKE_BAD[column].items(), key=repr)))
    return n_rows, row, column, value, wording


@settings(max_examples=25, deadline=None)
@given(case=corrupted_jsonl())
def test_mooncake_names_file_line_and_column(case: tuple[int, int, str, object, str]) -> None:
    n_rows, row, column, value, wording = case
    records = [
        {"timestamp": 1000 * i, "input_length": 50 + i, "output_length": 5 + i, "hash_ids": [i]}
        for i in range(n_rows)
    ]
    records[row][column] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        with pytest.raises(WorkloadError) as e:
            load_mooncake(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line {row + 1}: column {column} {wording}"), message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty file"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "empty file (header only)"),
        (
            "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6,3\n",
            "missing column(s) GeneratedTokens (found: TIMESTAMP, ContextTokens)",
        ),
        ('TIMESTAMP,ContextTokens,GeneratedTokens\n"2023-11-16,3,4\n', "not a readable CSV"),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6,3,4\n\n2023-11-16 18:15:47.6,3,4\n",
            "line 3: column TIMESTAMP is empty",
        ),
    ],
)
def test_csv_file_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(text)
    with pytest.raises(WorkloadError) as e:
        load_azure(path)
    assert str(e.value) == f"{path}: {expected}" or str(e.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(e.value)


def test_trailing_blank_lines_are_not_rows(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6,3,4\n\n\n")
    assert len(load_azure(path)) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1,\n',
            "line 2: not valid JSON",
        ),
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n[1, 2]\n',
            "line 2: expected a JSON object, got list",
        ),
        ('{"timestamp": 0, "input_length": 5}\n', "missing column(s) output_length"),
        ("\n\n", "empty file (no JSON records)"),
    ],
)
def test_jsonl_file_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    with pytest.raises(WorkloadError) as e:
        load_mooncake(path)
    assert str(e.value).startswith(f"{path}: {expected}"), str(e.value)
