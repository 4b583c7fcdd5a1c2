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
- Padded steps, built up front: a step that prefills runs a multiple of `STEP_TOKEN_MULTIPLE`
  tokens (a dummy prompt fills it up, its output dropped), and `warm_shapes` runs every such
  count and every decode batch once before the engine serves. vLLM's CPU linear layers build a
  oneDNN kernel for each token count a step has (`create_onednn_mm`, keyed by the row count);
  served prompts give nearly every prefill a count the engine never ran, and building costs
  5-60 ms a step on these machines, depending on how dear page faults are at that moment (the
  kernels' 256 KiB code mappings). Unpadded and cold, the admitting steps of the mixed validation
  test spent 3.96 s of an 8 s run on first builds at 0.3x saturation and 11.9 s of 15 s at 1.3x, a
  start-up transient a long-running server has long paid, and one that moved the hardware's
  saturated throughput by 35-47% against the simulator from one machine or hour to the next.

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
    # oneDNN's own cache of built kernels (1024 by default) must hold every shape `warm_shapes` builds:
    # about (prefill counts + 2 × max_num_seqs) × the model's weight shapes; evicted, one is built again.
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16384",
}
FIRST_TOKEN_ID = 3  # synthetic prompts avoid the usual special ids 0..2
# A step that prefills runs a multiple of this many tokens (module docstring). 32 rather than the
# torch engine's 16: half the shapes to build up front, at most 31 extra tokens a padded step.
STEP_TOKEN_MULTIPLE = 32
PAD_KEY = "pad"  # the dummy prompt's request id prefix; never one the runner uses (theirs are "<id>.<attempt>")


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
        """vLLM keeps one block back as its null block, and the padding prompt holds a few."""
        return self.kv_blocks + 1 + _PAD_BLOCKS

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
            "max_num_seqs": self.max_num_seqs + 1,  # + the padding prompt
            "max_num_batched_tokens": self.max_batched_tokens + STEP_TOKEN_MULTIPLE - 1,
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


_PAD_BLOCKS = -(-(STEP_TOKEN_MULTIPLE - 1) // BLOCK_TOKENS)  # the most blocks a padding prompt holds


def padded_tokens(tokens: int) -> int:
    """The token count a step that prefills runs at: `tokens` rounded up to `STEP_TOKEN_MULTIPLE`."""
    return -(-tokens // STEP_TOKEN_MULTIPLE) * STEP_TOKEN_MULTIPLE


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


def prompt_lengths(tokens: int, longest: int) -> list[int]:
    """Prompts of at most `longest` tokens that add up to `tokens`, as even as they can be."""
    n = -(-tokens // longest)
    return [tokens // n + (k < tokens % n) for k in range(n)]


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one request."""

    key: str
    new_tokens: tuple[int, ...]
    finished: bool


class VLLMEngine:
    """A thin wrapper over `vllm.LLMEngine`: add/abort by key, one `step()` = one forward pass,
    padded when it prefills (module docstring)."""

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
        self.warm_s = 0.0
        self._held: set[str] = set()  # requests the engine holds: they decode in the next step
        self._new: dict[str, int] = {}  # requests added since the last step: their prompts prefill in the next
        self._pads = 0
        self.last_step_tokens = 0  # what the last step ran, padding included

    def add(self, key: str, token_ids: list[int], max_tokens: int) -> None:
        params = self._sampling(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                                temperature=0.0, output_kind=self._delta)
        self._engine.add_request(key, {"prompt_token_ids": token_ids}, params)
        self._held.add(key)
        self._new[key] = len(token_ids)

    def abort(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._engine.abort_request(keys)
        self._held.difference_update(keys)
        for key in keys:
            self._new.pop(key, None)

    def step(self) -> list[StepOutput]:
        """One forward pass. If it prefills, a dummy prompt pads its tokens (the held requests'
        decodes plus the new prompts, all run in one step as the engine is sized) up to
        `STEP_TOKEN_MULTIPLE`; the dummy finishes in the same step and its output is dropped."""
        tokens = len(self._held) - len(self._new) + sum(self._new.values())
        pad_key = None
        if self._new and (pad := padded_tokens(tokens) - tokens):
            self._pads += 1
            pad_key = f"{PAD_KEY}-{self._pads}"
            self.add(pad_key, synthetic_prompt(-self._pads, pad, self.config.vocab_size), 1)
            tokens += pad
        self.last_step_tokens = tokens
        self._new.clear()
        outputs = []
        for o in self._engine.step():
            if o.finished:
                self._held.discard(o.request_id)
            if o.request_id != pad_key:
                outputs.append(StepOutput(o.request_id, tuple(o.outputs[0].token_ids), o.finished))
        if pad_key in self._held:  # not run in this step after all: never let it pad a later one
            self.abort([pad_key])
        return outputs

    def has_work(self) -> bool:
        return self._engine.has_unfinished_requests()

    def warm_shapes(self) -> None:
        """Run each shape a served step can have once, so that serving builds no kernel (oneDNN keys
        a kernel on the rows it multiplies, and the rows sampled in a step that prefills are
        gathered, so keyed apart from a decode's):
        - every padded prefill count up to the token budget (or the KV blocks, if fewer), as
          prompts of the longest length;
        - every count of sequences a step that prefills can sample, up to `max_num_seqs` + the
          padding prompt: that many one-token prompts;
        - every decode batch from `max_num_seqs` down to one: a full batch of one-token prompts
          losing one request a step (begun afresh when their contexts reach the longest).
        Seconds in `warm_s`."""
        t0 = time.perf_counter()
        cfg = self.config
        longest = cfg.max_model_len - 1

        def prefill(name: str, lengths: list[int]) -> None:
            for i, n in enumerate(lengths):
                self.add(f"warm-{name}-{i}", synthetic_prompt(i, n, cfg.vocab_size), 1)
            while self.has_work():
                self.step()

        budget = min(cfg.max_batched_tokens, cfg.kv_blocks * BLOCK_TOKENS)
        for tokens in range(STEP_TOKEN_MULTIPLE, budget + 1, STEP_TOKEN_MULTIPLE):
            lengths = prompt_lengths(tokens, longest)
            if len(lengths) > cfg.max_num_seqs:
                break
            prefill(f"t{tokens}", lengths)
        for seqs in range(1, cfg.max_num_seqs + 1):
            prefill(f"s{seqs}", [1] * seqs)
        held: list[str] = []
        steps_left = 0
        for batch in range(cfg.max_num_seqs, 0, -1):
            if steps_left == 0:
                self.abort(held)
                held = [f"warm-b{batch}-{i}" for i in range(batch)]
                for i, key in enumerate(held):
                    self.add(key, synthetic_prompt(i, 1, cfg.vocab_size), longest - 1)
                self.step()  # their prefill
                steps_left = longest - 2
            self.abort(held[batch:])
            del held[batch:]
            self.step()
            steps_left -= 1
        self.abort(held)
        self.warm_s = time.perf_counter() - t0
