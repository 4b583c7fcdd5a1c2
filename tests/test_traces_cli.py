"""`python -m traces`: synth, convert, stats, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from traces import Workload, generate, muxserve_synthetic
from traces.__main__ import main

BURSTGPT = (
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n"
    "45,ChatGPT,1087,0,1087,Conversation log\n"
    "118,GPT-4,417,276,693,API log\n"
)


def test_synth_writes_the_muxserve_setup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "synth.parquet"
    assert (
        main(
            [
                "synth",
                "--alpha",
                "2.1",
                "--scale",
                "0.5",
                "--duration",
                "20",
                "--seed",
                "3",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    w = Workload.read(out)
    expected = generate(muxserve_synthetic(2.1, 0.5), 20.0, seed=3)
    pd.testing.assert_frame_equal(w.df, expected.df)
    assert w.meta["seed"] == 3 and len(w.meta["spec"]["llms"]) == 19


def test_synth_from_models_yaml_with_empirical_lengths(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - {name: llm-0, model: /ckpt/llama-7b, rate: 5}\n")
    trace = tmp_path / "b.csv"
    trace.write_text(BURSTGPT)
    out = tmp_path / "y.csv"
    args = [
        "synth",
        "--models",
        str(models),
        "--duration",
        "10",
        "--lengths-from",
        str(trace),
        "--no-clip",
    ]
    assert main([*args, "-o", str(out)]) == 0
    w = Workload.read(out)
    assert set(w.df["prompt_tokens"]) <= {472, 417} and set(w.df["model_type"]) == {"llama-7b"}


def test_convert_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "BurstGPT_1.csv"
    trace.write_text(BURSTGPT)
    out = tmp_path / "b.parquet"
    assert (
        main(["convert", str(trace), "--models", "ChatGPT=llm-0,GPT-4=llm-1", "-o", str(out)]) == 0
    )
    captured = capsys.readouterr()
    assert "dropped 1 of 3 requests: failed request" in captured.err
    assert Workload.read(out).models == ["llm-0", "llm-1"]
    assert main(["stats", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "llm-0" in printed and "llm-1" in printed and "(all)" in printed
    assert "alpha" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stats", "{tmp}/missing.csv"], "error: {tmp}/missing.csv: file not found"),
        (["stats", "{tmp}/notes.txt"], "error: {tmp}/notes.txt: unknown format"),
        (
            ["convert", "{tmp}/b.csv", "--rate", "2", "-o", "{tmp}/x.parquet"],
            "error: {tmp}/b.csv: format burstgpt does not take rate",
        ),
        (
            ["convert", "{tmp}/b.csv", "-o", "{tmp}/x.txt"],
            "error: {tmp}/x.txt: unknown workload format '.txt'",
        ),
        (
            ["synth", "--models", "{tmp}/notes.txt", "-o", "{tmp}/x.parquet"],
            "error: {tmp}/notes.txt: expected a mapping",
        ),
    ],
)
def test_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "b.csv").write_text(BURSTGPT)
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith(message.format(tmp=tmp_path)), err


def test_module_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "azure.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,-3,4\n")
    result = subprocess.run(
        [sys.executable, "-m", "traces", "stats", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {bad}: line 2: column ContextTokens is negative (-3)\n"
