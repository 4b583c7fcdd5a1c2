"""Format loaders on small files written here in each published format, and the dispatcher."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from traces import (
    Cluster,
    Workload,
    WorkloadError,
    guess_format,
    load,
    load_azure,
    load_burstgpt,
    load_lmsys,
    load_mooncake,
    load_muxserve_yaml,
    load_sharegpt,
    read_muxserve_yaml,
)
from traces.loaders import parse_models

# ---------------------------------------------------------------- ShareGPT


def sharegpt_records() -> list[dict[str, Any]]:
    def turn(who: str, text: str) -> dict[str, str]:
        return {"from": who, "value": text}

    return [
        {"id": "a", "conversations": [turn("human", "Hello there"), turn("gpt", "x" * 40)]},
        {"id": "b", "conversations": [turn("human", "only one turn")]},
        {"id": "c", "conversations": [turn("gpt", "hi"), turn("human", "yo")]},
        {"id": "d", "conversations": [turn("human", ""), turn("gpt", "answer to nothing")]},
        {
            "id": "e",
            "conversations": [
                turn("human", "abcdefgh"),
                turn("gpt", "abc"),
                turn("human", "more"),
                turn("gpt", "z"),
            ],
        },
    ]


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_first_exchange_approx_tokens_and_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_json(tmp_path / "sg.json", sharegpt_records())
    with caplog.at_level(logging.WARNING, logger="traces"):
        w = load_sharegpt(path, rate=2.0, model="llm-4", seed=1)
    assert w.df["source_row"].tolist() == [0, 4]
    assert w.df["prompt_tokens"].tolist() == [3, 2]  # ceil(11/4), ceil(8/4)
    assert w.df["output_tokens"].tolist() == [10, 1]
    assert (w.df["model"] == "llm-4").all()
    assert w.meta["tokenizer"] == "approx:chars/4"
    assert w.meta["dropped"] == {
        "fewer than 2 turns": 1,
        "first two turns are not human→gpt": 1,
        "prompt of 0 tokens": 1,
    }
    assert w.meta["rows_read"] == 5
    assert sum("dropped 1 of" in r.getMessage() for r in caplog.records) == 3
    assert load_sharegpt(path, rate=2.0, model="llm-4", seed=1).df.equals(w.df)


def test_sharegpt_arrivals_follow_the_given_rate(tmp_path: Path) -> None:
    conv = [{"from": "human", "value": "question"}, {"from": "gpt", "value": "answer"}]
    path = write_json(
        tmp_path / "many.json", [{"id": str(i), "conversations": conv} for i in range(4000)]
    )
    w = load_sharegpt(path, rate=20.0, seed=0)
    assert len(w) == 4000
    assert len(w) / w.df["arrival_s"].iloc[-1] == pytest.approx(20.0, rel=0.05)


def test_sharegpt_with_a_local_hugging_face_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "there": 2, "x": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    conv = [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "x x x x x"}]
    path = write_json(tmp_path / "sg.json", [{"id": "a", "conversations": conv}])
    w = load_sharegpt(path, rate=1.0, tokenizer=str(tmp_path / "tok"))
    assert w.meta["tokenizer"] == f"hf:{tmp_path / 'tok'}"
    assert w.df[["prompt_tokens", "output_tokens"]].iloc[0].tolist() == [2, 5]
    with pytest.raises(WorkloadError, match=r"^tokenizer '.*nowhere': cannot load it locally") as e:
        load_sharegpt(path, rate=1.0, tokenizer=str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"not": "a list"}, r"expected a JSON list of records"),
        ([["x"]], r"record 0 \(line [0-9]+\): expected a JSON object"),
        ([{"id": "a"}], r"record 0 \(line [0-9]+\): missing column conversations"),
        ([{"conversations": "text"}], r"record 0 \(line [0-9]+\): column conversations is not a list of messages"),
        (
            [{"conversations": [{"from": "human"}, {"from": "gpt"}]}],
            r"record 0 \(line [0-9]+\): column conversations: message 0 needs keys 'from' and 'value'",
        ),
    ],
)
def test_sharegpt_rejects_malformed_records(tmp_path: Path, data: Any, expected: str) -> None:
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(WorkloadError, match=expected) as e:
        load_sharegpt(path, rate=1.0)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_sharegpt_rejects_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a", "conversations": [}]')
    with pytest.raises(WorkloadError, match=r"broken.json: not valid JSON \(line 1 column"):
        load_sharegpt(path, rate=1.0)


# ---------------------------------------------------------------- LMSYS


def lmsys_rows() -> list[dict[str, Any]]:
    def conv(q: str, a: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    t0 = 1_682_000_000.0
    return [
        {
            "conversation_id": "c0",
            "model": "vicuna-13b",
            "conversation": conv("q" * 8, "a" * 20),
            "turn": 1,
            "tstamp": t0 + 10,
        },
        {
            "conversation_id": "c1",
            "model": "koala-13b",
            "conversation": conv("q" * 4, "a" * 4),
            "turn": 1,
            "tstamp": t0,
        },
        {
            "conversation_id": "c2",
            "model": "alpaca-13b",
            "conversation": conv("q", "a"),
            "turn": 1,
            "tstamp": t0 + 5,
        },
        {
            "conversation_id": "c3",
            "model": "vicuna-13b",
            "conversation": conv("q" * 12, "a" * 8),
            "turn": 2,
            "tstamp": t0 + 20,
        },
        {
            "conversation_id": "c4",
            "model": "koala-13b",
            "conversation": conv("q" * 4, ""),
            "turn": 1,
            "tstamp": t0 + 30,
        },
    ]


MAPPING = {"vicuna-13b": "llm-0", "koala-13b": "llm-1"}


def write_lmsys(path: Path) -> Path:
    rows = lmsys_rows()
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        write_json(path, rows)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["lmsys.json", "lmsys.jsonl", "lmsys.parquet"])
def test_lmsys_maps_models_and_counts_drops(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_lmsys(tmp_path / name)
    assert guess_format(path) == "lmsys"
    with caplog.at_level(logging.WARNING, logger="traces"):
        w = load(path, models=MAPPING)
    assert w.df["model"].tolist() == ["llm-1", "llm-0", "llm-0"]  # sorted by tstamp
    assert w.df["arrival_s"].tolist() == [0.0, 10.0, 20.0]
    assert w.df["prompt_tokens"].tolist() == [1, 2, 3]
    assert w.df["output_tokens"].tolist() == [1, 5, 2]
    assert w.meta["dropped"] == {
        "model not in the mapping: alpaca-13b ×1": 1,
        "output of 0 tokens": 1,
    }
    assert any("alpaca-13b" in r.getMessage() for r in caplog.records)


def test_lmsys_window_then_condense(tmp_path: Path) -> None:
    path = write_lmsys(tmp_path / "lmsys.jsonl")
    w = load_lmsys(path, start_s=5, end_s=25, condense=10)
    assert w.df["arrival_s"].tolist() == pytest.approx([0.0, 0.5, 1.5])
    assert w.meta["dropped"]["outside the window [5, 25) s"] == 1
    assert w.meta["time_scale"] == pytest.approx(0.1)


def test_lmsys_without_tstamp_needs_a_rate(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "tstamp"} for r in lmsys_rows()]
    path = tmp_path / "chat1m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(WorkloadError, match=r"chat1m.jsonl: missing column tstamp \(pass rate="):
        load_lmsys(path)
    w = load_lmsys(path, rate=5.0, seed=2)
    assert len(w) == 4 and w.meta["rate"] == 5.0
    with pytest.raises(WorkloadError, match="has tstamp, so rate= does not apply"):
        load_lmsys(write_lmsys(tmp_path / "timed.jsonl"), rate=5.0)


def test_lmsys_rejects_a_non_list_conversation(tmp_path: Path) -> None:
    rows = lmsys_rows()
    rows[2]["conversation"] = "just text"
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        WorkloadError, match=r"bad.jsonl: line 3: column conversation is not a list of messages"
    ):
        load_lmsys(path)


# ---------------------------------------------------------------- CSV formats: Azure, BurstGPT


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_azure_2023_timestamps_with_seven_fractional_digits(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "AzureLLMInferenceTrace_conv.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2224670,879,55\n",
    )
    w = load_azure(path, model="llm-2")
    assert w.df["arrival_s"].tolist() == pytest.approx([0.0, 4.314579, 4.541877])
    assert w.df["prompt_tokens"].tolist() == [374, 396, 879]
    assert w.df["source_row"].tolist() == [2, 3, 4]
    assert (w.df["model"] == "llm-2").all()


def test_azure_2024_timestamps_with_utc_offset(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "AzureLLMInferenceTrace_code_1week.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,2048,20\n"
        "2024-05-10 00:00:01+00:00,100,0\n"
        "2024-05-10 00:00:02.509930+00:00,17,3\n",
    )
    assert guess_format(path) == "azure"
    w = load(path)
    assert w.df["arrival_s"].tolist() == pytest.approx([0.0, 2.5])
    assert w.meta["dropped"] == {"output of 0 tokens": 1}


BURSTGPT = (
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n"
    "45,ChatGPT,1087,0,1087,Conversation log\n"
    "118,GPT-4,417,276,693,API log\n"
    "200,ChatGPT,12,5,17,API log\n"
)


def test_burstgpt_drops_failures_and_maps_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_text(tmp_path / "BurstGPT_1.csv", BURSTGPT)
    assert guess_format(path) == "burstgpt"
    with caplog.at_level(logging.WARNING, logger="traces"):
        w = load_burstgpt(path, models={"ChatGPT": "llm-0"})
    assert w.df["arrival_s"].tolist() == [0.0, 195.0]
    assert w.df["model"].tolist() == ["llm-0", "llm-0"]
    assert w.meta["dropped"] == {
        "failed request (0 response tokens)": 1,
        "model not in the mapping: GPT-4 ×1": 1,
    }
    assert "failed request" in caplog.text
    assert load_burstgpt(path).models == ["ChatGPT", "GPT-4"]


def test_mooncake_fixture(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1]},
        {"timestamp": 1500, "input_length": 91, "output_length": 1, "hash_ids": [2]},
    ]
    path = write_text(tmp_path / "trace.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n")
    assert guess_format(path) == "mooncake"
    w = load_mooncake(path, model="llm-9")
    assert w.df["arrival_s"].tolist() == [0.0, 1.5]
    assert w.df["source_row"].tolist() == [1, 2]
    assert "hash_ids" not in w.df.columns


# ---------------------------------------------------------------- MuxServe YAML


MODELS_YAML = """\
cluster:
  nnodes: 1
  ngpus_per_node: 8
models:
  - name: llm-0
    model: /mnt/ckpts/huggyllama/llama-7b
    rate: 10
  - name: llm-1
    model: /mnt/ckpts/huggyllama/llama-13b
    rate: 2.5
"""


def test_muxserve_yaml_spec_and_generation(tmp_path: Path) -> None:
    path = write_text(tmp_path / "models.yaml", MODELS_YAML)
    spec = read_muxserve_yaml(path)
    assert spec.cluster == Cluster(1, 8)
    assert spec.rates() == {"llm-0": 10.0, "llm-1": 2.5}
    assert spec.model_types() == {"llm-0": "llama-7b", "llm-1": "llama-13b"}
    w = load(path, duration_s=100.0, seed=4)
    assert w.meta["format"] == "muxserve-yaml" and w.meta["source"] == str(path)
    assert set(w.df["model_type"]) == {"llama-7b", "llama-13b"}
    assert len(w) == pytest.approx(1250, abs=5 * np.sqrt(1250))
    pd.testing.assert_frame_equal(w.df, load_muxserve_yaml(path, duration_s=100.0, seed=4).df)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models: [\n  - a\n", r"not valid YAML \(.* at line \d+\)"),
        ("cluster: {nnodes: 1}\n", r"expected a mapping with a non-empty list under 'models'"),
        ("models:\n  - {name: a, model: m}\n", r"models\[0\]: missing key 'rate'"),
        (
            "models:\n  - {name: a, model: m, rate: 1}\n  - {name: b, model: m, rate: fast}\n",
            r"models\[1\] \(b\): rate must be a number",
        ),
        (
            "cluster: {nnodes: 0, ngpus_per_node: 8}\nmodels:\n  - {name: a, model: m, rate: 1}\n",
            r"cluster.nnodes must be a positive integer",
        ),
    ],
)
def test_muxserve_yaml_rejects_malformed_files(tmp_path: Path, text: str, expected: str) -> None:
    path = write_text(tmp_path / "models.yaml", text)
    with pytest.raises(WorkloadError, match=expected) as e:
        read_muxserve_yaml(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


# ---------------------------------------------------------------- dispatcher


def test_load_reads_back_a_written_workload(tmp_path: Path) -> None:
    w = load_burstgpt(write_text(tmp_path / "b.csv", BURSTGPT))
    for name in ("w.parquet", "w.csv"):
        back = load(w.write(tmp_path / name))
        assert back.meta["format"] == "burstgpt"
        pd.testing.assert_frame_equal(back.df, w.df, check_dtype=False)


def test_load_unknown_format_and_bad_options(tmp_path: Path) -> None:
    path = write_text(tmp_path / "notes.txt", "hello")
    with pytest.raises(
        WorkloadError, match=r"notes.txt: unknown format \(cannot tell from its extension '.txt'"
    ):
        load(path)
    csv = write_text(tmp_path / "other.csv", "a,b\n1,2\n")
    with pytest.raises(WorkloadError, match=r"other.csv: unknown format"):
        load(csv)
    with pytest.raises(WorkloadError, match=r"unknown format 'nope'"):
        load(csv, format="nope")
    azure = write_text(
        tmp_path / "az.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6,3,4\n"
    )
    with pytest.raises(
        WorkloadError, match=r"az.csv: format azure does not take rate \(it takes: model"
    ):
        load(azure, rate=2.0)
    with pytest.raises(WorkloadError, match=r"format sharegpt needs option\(s\) rate"):
        load(write_json(tmp_path / "sg.json", sharegpt_records()))
    with pytest.raises(WorkloadError, match=r"missing.csv: file not found"):
        load(tmp_path / "missing.csv")


def test_parse_models() -> None:
    assert parse_models("a=llm-0, b = llm-1") == {"a": "llm-0", "b": "llm-1"}
    assert parse_models('{"a": "llm-0"}') == {"a": "llm-0"}
    with pytest.raises(WorkloadError, match="trace=llm pairs"):
        parse_models("a,b")


def test_workload_read_names_duplicate_ids(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "dup.csv",
        "request_id,model,arrival_s,prompt_tokens,output_tokens\n0,m,0.0,1,1\n0,m,1.0,1,1\n",
    )
    with pytest.raises(WorkloadError, match=r"dup.csv: line 3: duplicate request_id 0"):
        load(path)
    assert isinstance(
        load(
            write_text(
                tmp_path / "ok.csv",
                "request_id,model,arrival_s,prompt_tokens,output_tokens\n0,m,0.0,1,1\n",
            )
        ),
        Workload,
    )


def test_muxserve_yaml_mean_lengths_are_honoured_within_the_limits(tmp_path: Path) -> None:
    text = MODELS_YAML + "avg_prompt_len: 100.17\navg_output_len: 261.31\n"
    path = write_text(tmp_path / "models.yaml", text)
    w = load_muxserve_yaml(path, duration_s=2000.0, seed=1)  # ~25,000 requests
    df = w.df
    assert df["prompt_tokens"].mean() == pytest.approx(100.17, rel=0.02)
    assert df["output_tokens"].mean() == pytest.approx(261.31, rel=0.02)
    assert df["prompt_tokens"].between(4, 1024).all() and (df["prompt_tokens"] + df["output_tokens"] <= 2048).all()
    plain = load_muxserve_yaml(write_text(tmp_path / "plain.yaml", MODELS_YAML), duration_s=2000.0, seed=1).df
    assert plain["prompt_tokens"].mean() == pytest.approx(161, rel=0.03)  # the ShareGPT fit, unscaled
    assert plain["output_tokens"].mean() == pytest.approx(338, rel=0.03)
    # Rescaled, not redrawn: the same shape (the long tail keeps its share).
    ratio = (df["output_tokens"] > 2 * df["output_tokens"].median()).mean()
    assert ratio == pytest.approx((plain["output_tokens"] > 2 * plain["output_tokens"].median()).mean(), abs=0.03)


@pytest.mark.parametrize(("extra", "expected"), [
    ("avg_prompt_len: 5000\n", r"avg_prompt_len/avg_output_len: mean prompt length 5000 is out of reach"),
    ("avg_output_len: -3\n", r"avg_output_len must be a number > 0 \(got -3\)"),
])
def test_muxserve_yaml_mean_lengths_that_cannot_work(tmp_path: Path, extra: str, expected: str) -> None:
    path = write_text(tmp_path / "models.yaml", MODELS_YAML + extra)
    with pytest.raises(WorkloadError, match=expected) as e:
        load_muxserve_yaml(path, duration_s=10.0)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


@pytest.mark.parametrize(("checkpoint", "preset"), [
    ("/mnt/afs/share/LLMCKPTs/huggyllama/llama-13b", "llama-13b"),
    ("/ckpts/huggyllama/llama-65b/", "llama-65b"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("llama-7b", "llama-7b"),
])
def test_muxserve_checkpoint_paths_resolve_to_presets(checkpoint: str, preset: str) -> None:
    from policies.specs import MODEL_PRESETS
    from traces.loaders.muxserve_yaml import model_type

    assert model_type(checkpoint) == preset and preset in MODEL_PRESETS
