"""MuxServe's workload description: `cluster: {nnodes, ngpus_per_node}`, `models: [{name, model, rate}]`,
and optionally the workload's mean lengths `avg_prompt_len` and `avg_output_len`.

Users migrating from MuxServe bring these files. They hold rates, not requests: the result is a
WorkloadSpec (with its cluster), which traces.synthetic.generate turns into requests. Where the
file states mean lengths (its ChatLMSYS files do: 100.2 and 261.3 tokens), the length distribution
is rescaled to those means within the length limits, keeping its shape.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from traces.lengths import (
    MUXSERVE_LIMITS,
    SHAREGPT_FIT,
    LengthLimits,
    LengthSampler,
    rescaled_to_means,
)
from traces.loaders._common import existing_file
from traces.schema import Workload, WorkloadError
from traces.spec import Cluster, ServedLLM, WorkloadSpec
from traces.synthetic import counts_by_rate, generate


def _cluster(path: Path, data: Any) -> Cluster | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise WorkloadError(f"{path}: cluster must be a mapping with nnodes and ngpus_per_node")
    values = []
    for key in ("nnodes", "ngpus_per_node"):
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise WorkloadError(f"{path}: cluster.{key} must be a positive integer (got {value!r})")
        values.append(value)
    return Cluster(*values)


def _llm(path: Path, i: int, entry: Any) -> ServedLLM:
    where = f"{path}: models[{i}]"
    if not isinstance(entry, dict):
        raise WorkloadError(f"{where}: expected a mapping with name, model and rate")
    for key in ("name", "model", "rate"):
        if entry.get(key) is None:
            raise WorkloadError(f"{where}: missing key {key!r}")
    rate = entry["rate"]
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or rate < 0
    ):
        raise WorkloadError(f"{where} ({entry['name']}): rate must be a number >= 0 (got {rate!r})")
    return ServedLLM(str(entry["name"]), model_type(str(entry["model"])), float(rate))


def model_type(checkpoint: str) -> str:
    """The preset name of a checkpoint path as MuxServe writes it: /mnt/…/huggyllama/llama-13b →
    llama-13b; Hugging Face names lose case and their -hf suffix (meta-llama/Llama-2-7b-hf →
    llama-2-7b)."""
    name = Path(checkpoint.rstrip("/")).name or checkpoint
    return name.lower().removesuffix("-hf")


def _mean(path: Path, data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise WorkloadError(f"{path}: {key} must be a number > 0 (got {value!r})")
    return float(value)


def _read(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = existing_file(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise WorkloadError(f"{path}: not valid YAML ({problem}{at})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise WorkloadError(f"{path}: expected a mapping with a non-empty list under 'models'")
    return path, data


def read_muxserve_yaml(path: str | Path) -> WorkloadSpec:
    """The spec of a MuxServe models YAML; the model type is the last part of each `model` path."""
    path, data = _read(path)
    llms = tuple(_llm(path, i, entry) for i, entry in enumerate(data["models"]))
    return WorkloadSpec(llms, _cluster(path, data.get("cluster")), label=str(path))


def mean_lengths(path: str | Path) -> tuple[float | None, float | None]:
    """The file's avg_prompt_len and avg_output_len, None where it does not state them."""
    path, data = _read(path)
    return _mean(path, data, "avg_prompt_len"), _mean(path, data, "avg_output_len")


def load_muxserve_yaml(
    path: str | Path,
    *,
    duration_s: float,
    seed: int = 0,
    cv: float = 1.0,
    lengths: LengthSampler = SHAREGPT_FIT,
    limits: LengthLimits = MUXSERVE_LIMITS,
    total_requests: int | None = None,
) -> Workload:
    """Requests generated from the YAML's rates (see traces.synthetic.generate for the options), with
    `lengths` rescaled to the file's mean lengths where it states them.

    `total_requests`: a fixed number of requests split over the LLMs by rate (MuxServe replays 8,091
    ChatLMSYS requests at every load level) instead of `duration_s` of arrivals.
    """
    spec = read_muxserve_yaml(path)
    prompt_mean, output_mean = mean_lengths(path)
    if prompt_mean is not None or output_mean is not None:
        p, o, _ = limits.clip(*lengths.sample(np.random.default_rng(0), 200_000))
        try:
            lengths = rescaled_to_means(lengths, prompt_mean or float(p.mean()), output_mean or float(o.mean()),
                                        limits)
        except WorkloadError as e:
            raise WorkloadError(f"{path}: avg_prompt_len/avg_output_len: {e}") from None
    counts = None if total_requests is None else counts_by_rate(spec, total_requests)
    workload = generate(spec, duration_s, seed, cv=cv, lengths=lengths, limits=limits, counts=counts)
    return workload.with_frame(workload.df, source=str(path), format="muxserve-yaml")
