"""MuxServe's workload description: `cluster: {nnodes, ngpus_per_node}`, `models: [{name, model, rate}]`.

Users migrating from MuxServe bring these files. They hold rates, not requests: the result is a
WorkloadSpec (with its cluster), which traces.synthetic.generate turns into requests.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from traces.lengths import MUXSERVE_LIMITS, SHAREGPT_FIT, LengthLimits, LengthSampler
from traces.loaders._common import existing_file
from traces.schema import Workload, WorkloadError
from traces.spec import Cluster, ServedLLM, WorkloadSpec
from traces.synthetic import generate


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
    # `model` is a checkpoint path such as /ckpts/huggyllama/llama-7b: its last part is the type.
    model_type = Path(str(entry["model"])).name or str(entry["model"])
    return ServedLLM(str(entry["name"]), model_type, float(rate))


def read_muxserve_yaml(path: str | Path) -> WorkloadSpec:
    """The spec of a MuxServe models YAML; the model type is the last part of each `model` path."""
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
    llms = tuple(_llm(path, i, entry) for i, entry in enumerate(data["models"]))
    return WorkloadSpec(llms, _cluster(path, data.get("cluster")), label=str(path))


def load_muxserve_yaml(
    path: str | Path,
    *,
    duration_s: float,
    seed: int = 0,
    cv: float = 1.0,
    lengths: LengthSampler = SHAREGPT_FIT,
    limits: LengthLimits = MUXSERVE_LIMITS,
) -> Workload:
    """Requests generated from the YAML's rates (see traces.synthetic.generate for the options)."""
    workload = generate(
        read_muxserve_yaml(path), duration_s, seed, cv=cv, lengths=lengths, limits=limits
    )
    return workload.with_frame(workload.df, source=str(path), format="muxserve-yaml")
