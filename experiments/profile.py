"""Profile one model's step latency on this machine and write the table the cost model reads.

    python -m experiments.profile                                   # a tiny Llama, dummy weights, CPU
    python -m experiments.profile out=profiles/tiny.csv grid.repeats=10 grid.batches=[1,4,16]
    python -m experiments.profile model=llama-7b device=cuda        # a preset shape, on a GPU with MPS
    python -m experiments.profile model_path=/ckpt/llama dummy=false  # a real checkpoint folder
    python -m experiments.profile engine=torch device=cuda model=llama-7b  # no vLLM: hwloop.torch_engine

Then simulate with it: `python -m experiments.run cost=profile cost.path=<out>`.
The config lives here (a structured config) rather than in conf/, since no other entry point
composes it; every field can be overridden on the command line as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.utils import to_absolute_path
from omegaconf import OmegaConf

from hwloop.profiler import Grid, ProfileError, profile, write_profile
from policies.specs import ModelSpec, SpecError, model_spec

log = logging.getLogger("muxsim.profile")


@dataclass
class GridConfig:
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seq_lens: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    sm_pcts: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    phases: list[str] = field(default_factory=lambda: ["prefill", "decode"])
    warmup: int = 2
    repeats: int = 5
    max_prefill_tokens: int | None = None  # skip prefill cells above this many tokens
    max_kv_tokens: int | None = None  # skip cells whose KV cache would exceed this many tokens


@dataclass
class SpecConfig:
    """The model shape used when neither `model` nor `model_path` is given: small enough for a CPU."""

    name: str = "tiny-llama"
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 688
    vocab_size: int = 1024
    max_context: int = 2048


@dataclass
class ProfileConfig:
    model: str | None = None  # a preset name from policies.specs
    model_path: str | None = None  # a config.json, or a folder holding one (a checkpoint if dummy=false)
    dummy: bool = True  # random weights: only the config is needed
    spec: SpecConfig = field(default_factory=SpecConfig)
    device: str = "cpu"  # cpu | cuda
    engine: str = "vllm"  # vllm | torch (plain PyTorch, random weights: hwloop.torch_engine)
    partition: str = "mps"  # CUDA: mps | green (torch engine only) | none (sm_pcts=[100] only)
    cores: list[int] | None = None  # CPU: the cores to use (default: all this process may use)
    gpus: list[int] = field(default_factory=lambda: [0])  # CUDA: the GPUs one engine runs on
    grid: GridConfig = field(default_factory=GridConfig)
    out: str = "profile.parquet"  # .parquet or .csv
    startup_timeout_s: float = 600.0


ConfigStore.instance().store(name="profile", node=ProfileConfig)


def resolve_spec(cfg: Any) -> tuple[ModelSpec, Path | None]:
    """The shape to profile and, for model_path, the folder vLLM should load."""
    if cfg.model_path:
        path = Path(to_absolute_path(cfg.model_path))
        return ModelSpec.from_hf_config(path, name=cfg.model or None), (path if path.is_dir() else path.parent)
    if cfg.model:
        return model_spec(cfg.model), None
    return ModelSpec(**OmegaConf.to_container(cfg.spec)), None  # type: ignore[arg-type]


@hydra.main(config_path=None, config_name="profile", version_base=None)
def main(cfg: Any) -> None:
    if cfg.device not in ("cpu", "cuda"):
        raise SystemExit(f"device must be cpu or cuda (got {cfg.device!r})")
    if cfg.engine not in ("vllm", "torch"):
        raise SystemExit(f"engine must be vllm or torch (got {cfg.engine!r})")
    if not cfg.dummy and not cfg.model_path:
        raise SystemExit("dummy=false needs model_path: a checkpoint folder")
    try:
        spec, folder = resolve_spec(cfg)
        grid = Grid(**{k: tuple(v) if isinstance(v, list | tuple) else v
                       for k, v in OmegaConf.to_container(cfg.grid).items()})  # type: ignore[union-attr]
        result = profile(spec, grid, device=cfg.device, backend=cfg.engine, partition=cfg.partition,
                         cores=cfg.cores, gpus=tuple(cfg.gpus),
                         model_dir=folder, dummy=cfg.dummy,
                         startup_timeout_s=cfg.startup_timeout_s, progress=log.info)
    except (SpecError, ProfileError) as e:
        raise SystemExit(str(e)) from None
    out = write_profile(result, to_absolute_path(cfg.out))
    t = result.table
    log.info("wrote %s: %d cells of %s on %s with %s (%s)", out, len(t), spec.name, cfg.device, cfg.engine,
             result.meta["host"]["cpu_model"])
    worst = (t.std_ms / t.latency_ms).max()
    log.info("largest relative spread (std/mean) of a cell: %.1f%%", 100 * worst)


if __name__ == "__main__":
    main()
