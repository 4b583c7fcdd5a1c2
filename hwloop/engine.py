"""One in-process vLLM engine, sized so that it executes exactly what the batching policy admits.

The policy, not vLLM, decides who runs. So the engine is configured never to decide anything
itself:
- KV cache: vLLM blocks of `BLOCK_TOKENS` tokens, the pool's own chunk size, so a request holds
  exactly `blocks_for_tokens(context, chunk) / chunk` vLLM blocks, step for step (checked against
  vLLM 0.32: a decode step at context c holds ceil(c / 32) blocks). The engine gets enough blocks
  for everything the policy could admit (the whole unit pool, or max_batch full-length requests if
  fewer), so it never runs out and never preempts on its own.
- `max_num_seqs` = the LLM's batch cap and a token budget that covers the largest admission plus
  one decode token per running request, so vLLM never splits a prefill into chunks.
- Prefix caching off: two requests with equal prompts must both be computed, as in the simulator.
- Eager mode: no torch.compile, which would add minutes to start-up on CPU.
- Greedy sampling with `ignore_eos` and `min_tokens = max_tokens`: every request produces exactly
  its trace's output length.

Prompts are token ids (`skip_tokenizer_init`); with `dummy=True` the weights are random
(`load_format="dummy"`) and the folder only needs a `config.json`. A real checkpoint folder runs
unchanged with `dummy=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from policies.placement import BLOCK_TOKENS
from policies.specs import ModelSpec

# Set in every engine process before vLLM is imported.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: one step() = one forward
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
FIRST_TOKEN_ID = 3  # synthetic prompts avoid the usual special ids 0..2


@dataclass(frozen=True)
class EngineConfig:
    """Everything a worker needs to build its engine; plain data, so it crosses a process boundary."""

    model_dir: str
    dummy: bool
    dtype: str  # "bfloat16" | "float16" | "float32"
    max_model_len: int
    kv_blocks: int  # usable vLLM blocks of BLOCK_TOKENS tokens
    kv_bytes_per_token: int
    max_num_seqs: int
    max_batched_tokens: int
    vocab_size: int
    seed: int = 0
    gpu_memory_utilization: float | None = None  # CUDA only: this engine's slice of GPU memory

    @property
    def kv_cache_bytes(self) -> int:
        return self.vllm_blocks * BLOCK_TOKENS * self.kv_bytes_per_token

    @property
    def vllm_blocks(self) -> int:
        """vLLM keeps one block back as its null block."""
        return self.kv_blocks + 1

    def engine_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": self.model_dir,
            "skip_tokenizer_init": True,
            "load_format": "dummy" if self.dummy else "auto",
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "block_size": BLOCK_TOKENS,
            "num_gpu_blocks_override": self.vllm_blocks,
            "kv_cache_memory_bytes": self.kv_cache_bytes,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_batched_tokens,
            "enable_prefix_caching": False,
            "enforce_eager": True,
            "disable_log_stats": True,
            "seed": self.seed,
        }
        if self.gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        return args

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_config(spec: ModelSpec, model_dir: str | Path, *, max_batch: int, pool_blocks: int,
                  chunk_blocks: int, prefill_tokens: int, dummy: bool = True,
                  max_model_len: int | None = None, seed: int = 0) -> EngineConfig:
    """Size an engine for one placed LLM (see the module docstring for why each number).

    `pool_blocks` is the unit's KV pool in pool blocks, `chunk_blocks` this model's pool blocks per
    BLOCK_TOKENS tokens, `prefill_tokens` the policy's largest admission in tokens.
    """
    max_len = min(spec.max_context, max_model_len or spec.max_context)
    per_request = -(-max_len // BLOCK_TOKENS)
    # vLLM refuses to start unless one full-length request fits, whatever the pool says.
    blocks = max(per_request, min(pool_blocks // chunk_blocks, max_batch * per_request))
    return EngineConfig(
        model_dir=str(model_dir),
        dummy=dummy,
        dtype="float32" if spec.dtype_bytes == 4 else "bfloat16",
        max_model_len=max_len,
        kv_blocks=blocks,
        kv_bytes_per_token=spec.kv_bytes_per_token,
        max_num_seqs=max_batch,
        max_batched_tokens=max(prefill_tokens, max_len) + max_batch,
        vocab_size=spec.vocab_size,
        seed=seed,
    )


def write_model_dir(spec: ModelSpec, root: str | Path) -> Path:
    """A folder holding only `config.json` for `spec`: enough for vLLM's dummy weights.

    Named by a hash of the config, so concurrent runs share folders and never see a half-written one.
    """
    text = json.dumps(spec.to_hf_config(), indent=2, sort_keys=True)
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    path = Path(root) / f"{spec.name}-{digest}"
    if not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f"config.json.{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(path / "config.json")
    return path


def synthetic_prompt(seed: int, length: int, vocab_size: int) -> list[int]:
    """Distinct, deterministic token ids: no two requests share a prefix by accident."""
    span = max(1, vocab_size - FIRST_TOKEN_ID)
    return [FIRST_TOKEN_ID + (seed * 7919 + i * 31) % span for i in range(length)]


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one request."""

    key: str
    new_tokens: tuple[int, ...]
    finished: bool


class VLLMEngine:
    """A thin wrapper over `vllm.LLMEngine`: add/abort by key, one `step()` = one forward pass."""

    def __init__(self, config: EngineConfig) -> None:
        for k, v in ENGINE_ENV.items():
            os.environ.setdefault(k, v)
        t0 = time.perf_counter()
        from vllm import EngineArgs, LLMEngine, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        t1 = time.perf_counter()
        self.config = config
        self._engine = LLMEngine.from_engine_args(EngineArgs(**config.engine_args()))
        self._sampling = SamplingParams
        self._delta = RequestOutputKind.DELTA
        self.import_s = t1 - t0
        self.build_s = time.perf_counter() - t1

    def add(self, key: str, token_ids: list[int], max_tokens: int) -> None:
        params = self._sampling(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                                temperature=0.0, output_kind=self._delta)
        self._engine.add_request(key, {"prompt_token_ids": token_ids}, params)

    def abort(self, keys: Iterable[str]) -> None:
        self._engine.abort_request(list(keys))

    def step(self) -> list[StepOutput]:
        return [StepOutput(o.request_id, tuple(o.outputs[0].token_ids), o.finished)
                for o in self._engine.step()]

    def has_work(self) -> bool:
        return self._engine.has_unfinished_requests()
