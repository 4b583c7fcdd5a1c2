"""Shapes of models, GPUs and clusters: the numbers memory and roofline arithmetic need.

Presets carry the public Hugging Face configs of the models MuxServe and its successors serve, so a
user can name a model without shipping its config; `ModelSpec.from_hf_config` reads any other one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024**3


class SpecError(ValueError):
    """An unknown model/GPU name or an unreadable config; the message names what was asked for."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    tied_embeddings: bool = False
    qkv_bias: bool = False
    max_context: int = 2048

    def __post_init__(self) -> None:
        """Shapes from configs are checked here: a zero or negative size gives negative memory and
        latencies that no later step notices."""
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
                     "vocab_size", "dtype_bytes", "max_context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"model {self.name}: {name} must be an integer ≥ 1 (got {value!r})")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise SpecError(f"model {self.name}: hidden_size ({self.hidden_size}) must divide into num_heads "
                            f"({self.num_heads}), and those into num_kv_heads ({self.num_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def params(self) -> int:
        """Parameter count of a Llama-style decoder (attention + gated MLP + embeddings + norms)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h + (h + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer and KV head (GQA shrinks this, not the weights)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def flops_per_token(self) -> float:
        """Dense matmul FLOPs of one token's forward pass, attention-score work excluded."""
        return 2.0 * (self.params - self.vocab_size * self.hidden_size * (0 if self.tied_embeddings else 1))

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        """Build from a Hugging Face `config.json` (a file, or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"{path}: model config not found") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in cfg:
                raise SpecError(f"{path}: field {key} missing from model config")
        dtype = str(cfg.get("torch_dtype", cfg.get("dtype", "bfloat16")))
        return cls(
            name=name or cfg.get("_name_or_path") or path.parent.name,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            dtype_bytes=4 if "32" in dtype else 2,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=cfg.get("model_type") == "qwen2",
            max_context=int(cfg.get("max_position_embeddings", 2048)),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A Llama `config.json` with this shape: what vLLM needs to build the model with dummy weights."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_context,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tied_embeddings,
            "torch_dtype": "bfloat16" if self.dtype_bytes == 2 else "float32",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


def _llama(name: str, layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int = 32000,
           ctx: int = 2048, **kw: Any) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, kv, inter, vocab, max_context=ctx, **kw)


MODEL_PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _llama("llama-7b", 32, 4096, 32, 32, 11008),
        _llama("llama-13b", 40, 5120, 40, 40, 13824),
        _llama("llama-30b", 60, 6656, 52, 52, 17920),
        _llama("llama-65b", 80, 8192, 64, 64, 22016),
        _llama("llama-2-7b", 32, 4096, 32, 32, 11008, ctx=4096),
        _llama("llama-2-13b", 40, 5120, 40, 40, 13824, ctx=4096),
        _llama("llama-2-70b", 80, 8192, 64, 8, 28672, ctx=4096),
        _llama("llama-3-8b", 32, 4096, 32, 8, 14336, vocab=128256, ctx=8192),
        _llama("llama-3-70b", 80, 8192, 64, 8, 28672, vocab=128256, ctx=8192),
        _llama("mistral-7b", 32, 4096, 32, 8, 14336, ctx=32768),
        _llama("qwen2.5-7b", 28, 3584, 28, 4, 18944, vocab=152064, ctx=32768, qkv_bias=True),
        _llama("qwen2.5-72b", 80, 8192, 64, 8, 29568, vocab=152064, ctx=32768, qkv_bias=True),
    )
}


def model_spec(name: str, extra: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """Look up a preset (or a user-registered spec); unknown names fail with the list of known ones."""
    return _preset("model", name, {**MODEL_PRESETS, **(extra or {})})


def _preset(kind: str, name: str, table: dict[str, Any]) -> Any:
    if name in table:
        return table[name]
    raise SpecError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")


@dataclass(frozen=True)
class GPUSpec:
    """Peak numbers from vendor datasheets (dense bf16, no sparsity); roofline inputs only."""

    name: str
    memory_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    link_bandwidth: float  # per-GPU NVLink bandwidth for tensor-parallel all-reduce, bytes/s
    link_latency_s: float = 8e-6


GPU_PRESETS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        GPUSpec("A100-80GB", 80 * GiB, 312e12, 2.039e12, 300e9),
        GPUSpec("H100-SXM", 80 * GiB, 989e12, 3.35e12, 450e9),
        GPUSpec("H200", 141 * GiB, 989e12, 4.8e12, 450e9),
    )
}


def gpu_spec(name: str) -> GPUSpec:
    return _preset("GPU", name, GPU_PRESETS)


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes × GPUs per node; a mesh (and so an LLM unit) never spans nodes."""

    nnodes: int
    gpus_per_node: int
    gpu: GPUSpec = field(default_factory=lambda: GPU_PRESETS["A100-80GB"])
    # Memory each GPU keeps back from the KV pool for activations, CUDA context and fragmentation.
    reserve_bytes_per_gpu: int = 4 * GiB

    def __post_init__(self) -> None:
        if self.nnodes < 1 or self.gpus_per_node < 1:
            raise SpecError(f"cluster must have ≥1 node and ≥1 GPU per node (got {self.nnodes}×{self.gpus_per_node})")

    @property
    def num_gpus(self) -> int:
        return self.nnodes * self.gpus_per_node
