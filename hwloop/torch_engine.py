"""A Llama-shaped model in plain PyTorch: the engine for GPUs (and CPUs) without vLLM.

Why the project's own implementation rather than transformers' `LlamaForCausalLM`: it needs
nothing but torch, its KV cache is laid out for batched serving steps, and every kernel a step
launches is in this file, so a timing can be explained. tests/test_torch_engine.py checks it
against `LlamaForCausalLM` logit for logit where transformers is installed.

Model: embedding → N × [RMSNorm → attention (fused QKV projection, rotary embeddings in the HF
"rotate half" convention with θ = 10000, grouped-query attention through SDPA) → residual →
RMSNorm → SwiGLU MLP (fused gate/up projection) → residual] → RMSNorm → LM head (tied or not).
Weights are random, N(0, 0.02) with unit norms: a step's latency depends on shapes, not values.
It is built from a `ModelSpec`, or from the `config.json` vLLM would load (`from_engine_config`).

KV cache (`KVCache`): per layer, K and V of shape [slots, kv_heads, max_len, head_dim]. A sequence
owns one slot (a row); a step works on a contiguous range of rows, so keys are read in place through
a view, never gathered. Lengths live on the host, as in a serving engine's scheduler, so no step
asks the GPU how long its sequences are.

Steps:
- prefill: a batch of prompts into empty rows, **right-padded** to the longest (padding, not
  packing). Causal attention alone makes the padding harmless: a real token at position i attends
  to keys ≤ i, all real; padded queries are computed and discarded, and padded keys land past the
  row's length, where its decode steps overwrite them. Padding costs the padded tokens' compute and
  nothing else; the profiler's cells have equal lengths, so no padding is ever timed. The paged
  prefill of the split workers (`prefill_paged`) packs instead: their batches do mix lengths.
- decode: one token per row, appended at that row's own length. Equal lengths (every profiler
  cell) need no attention mask; unequal ones mask the keys past each row's length.
Only the last position of each row goes through the LM head, as in vLLM.

`TorchStepEngine` is the profiler's `StepEngine` over this model (see its docstring for timing).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hwloop.engine import EngineConfig
from hwloop.kv_pool import PAD_TOKENS, PagedLayout
from hwloop.profiler import PREFILL_OFFSETS
from policies.placement import BLOCK_TOKENS
from policies.specs import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROPE_THETA = 10000.0
RMS_EPS = 1e-6
INIT_STD = 0.02
FIRST_TOKEN_ID = 3  # random prompts avoid the usual special ids 0..2
# A worker started with this variable set runs inside a CUDA green context holding that share of
# the SMs (the SM partitioning PyTorch offers without MPS; see `green_sms`).
GREEN_ENV = "MUXSIM_GREEN_SM_PCT"


class TorchEngineError(RuntimeError):
    """A step the engine cannot run as asked (a full row, a prefill into a non-empty row)."""


@dataclass
class KVCache:
    """K and V per layer, [slots, kv_heads, max_len, head_dim]; `lengths[i]` = tokens row i holds."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: list[int]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Write this step's keys/values into the cache rows, then attend (q, k, v: [B, heads, S, hd])."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        gqa = k.shape[1] != q.shape[1]
        rows = step.rows
        if step.write_at is None:  # prefill into empty rows: the new keys are all there is
            k_cache[rows, :, : k.shape[2]] = k
            v_cache[rows, :, : v.shape[2]] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if isinstance(step.write_at, int):
            k_cache[rows, :, step.write_at] = k[:, :, 0]
            v_cache[rows, :, step.write_at] = v[:, :, 0]
        else:
            batch = torch.arange(k.shape[0], device=k.device)
            k_cache[rows][batch, :, step.write_at] = k[:, :, 0]
            v_cache[rows][batch, :, step.write_at] = v[:, :, 0]
        keys, values = k_cache[rows, :, : step.n_keys], v_cache[rows, :, : step.n_keys]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, enable_gqa=gqa)


@dataclass(frozen=True)
class Step:
    """Where one forward pass reads and writes the cache.

    `write_at` is None for a prefill into empty rows; for a decode it is the position every row
    appends at (an int when all rows hold the same number of tokens) or one position per row.
    """

    rows: slice
    positions: torch.Tensor  # prefill: [S]; decode: [B]
    write_at: int | torch.Tensor | None = None
    n_keys: int = 0  # decode: keys to attend over (the longest row after this step)
    mask: torch.Tensor | None = None  # decode with unequal lengths: [B, 1, 1, n_keys]
    packed: tuple[int, ...] = ()  # packed prefill: the prompts' lengths, laid one after another in a single row


class KVStore(Protocol):
    """Where a layer's keys and values live: rows of a `KVCache`, or blocks of a shared pool (`PagedKV`)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Store this step's k, v (each [B, kv_heads, S, hd]) for `layer`, return attention of q over the context."""
        ...


@dataclass
class PagedKV:
    """A batch's KV in pool blocks, read and written through each row's block table (paged attention).

    `pool` is the unit's pool seen in this model's dtype, [blocks, 2 (K, V), BLOCK_TOKENS, width]
    (`hwloop.kv_pool.PagedLayout`). `tables[b]` holds row b's block ids as [chunks, layers, slices];
    past the chunks row b has written it repeats its own first chunk (`TorchEngine._paged`).
    `held[b]`: tokens row b's blocks held before this step. Decode gathers the rows' blocks into one
    [heads, keys, hd] tensor and calls `scaled_dot_product_attention`: a copy of the context per
    step, the simple way on CPU (a fused paged kernel would read the blocks in place). Masked keys
    must be finite, since 0 × NaN is NaN and a recycled block holds another request's bytes, maybe
    of another dtype: a decode clears a block when it writes its first token, a prefill writes
    whole chunks, and a row never reads a chunk it has not written.
    """

    pool: torch.Tensor
    tables: torch.Tensor
    chunks: list[int]  # chunks of each row's table (the rest is padding)
    held: list[int]

    def _slices(self, x: torch.Tensor) -> torch.Tensor:
        """[B, kv_heads, S, hd] → [B, S, slices, width]: one layer's K or V per token, cut into blocks."""
        b, _h, s, _hd = x.shape
        return x.transpose(1, 2).reshape(b, s, self.tables.shape[-1], self.pool.shape[-1])

    @staticmethod
    def _heads_major(blocks: torch.Tensor, b: int, c: int, heads: int, hd: int) -> torch.Tensor:
        """Gathered blocks → K and V as [2, B, kv_heads, chunks · BLOCK_TOKENS, hd], in one copy, laid
        out as attention reads them: keys of one head contiguous. (On the token-major view, CPU SDPA
        took 18 ms a call against 7 ms, batch 32 × 256 tokens, one core, torch.profiler, once.)"""
        t, width = blocks.shape[2], blocks.shape[3]
        if width >= hd:  # a block slice holds width / hd whole heads
            x = blocks.view(b, c, -1, 2, t, width // hd, hd).permute(3, 0, 2, 5, 1, 4, 6)
        else:  # a head spans hd / width consecutive slices
            x = blocks.view(b, c, heads, hd // width, 2, t, width).permute(4, 0, 2, 1, 5, 3, 6)
        return x.reshape(2, b, heads, c * t, hd)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        gqa = k.shape[1] != q.shape[1]
        ids = self.tables[:, :, layer]  # [B, chunks, slices]
        if step.write_at is None:  # packed prefill into empty blocks: each prompt writes its own, then attends over them
            out, start = [], 0
            for b, n in enumerate(step.packed):
                part = slice(start, start + n)
                if b < len(self.chunks):  # the padding after the prompts (`PAD_TOKENS`) writes no block
                    chunks = self.chunks[b]
                    for which, x in ((0, k[:, :, part]), (1, v[:, :, part])):
                        rows = F.pad(self._slices(x)[0], (0, 0, 0, 0, 0, chunks * BLOCK_TOKENS - n))
                        self.pool[ids[b, :chunks], which] = rows.view(chunks, BLOCK_TOKENS,
                                                                      *rows.shape[1:]).transpose(1, 2)
                out.append(F.scaled_dot_product_attention(q[:, :, part], k[:, :, part], v[:, :, part], is_causal=True,
                                                          enable_gqa=gqa))
                start += n
            return torch.cat(out, dim=2)
        pos = step.positions
        batch = torch.arange(k.shape[0], device=k.device)
        at = ids[batch, pos // BLOCK_TOKENS]  # [B, slices]: the blocks this step's token goes to
        offset = (pos % BLOCK_TOKENS)[:, None]
        fresh = pos % BLOCK_TOKENS == 0
        if bool(fresh.any()):  # a block's first token: clear its other positions (a previous owner's bytes)
            self.pool[at[fresh].flatten(), :, 1:] = 0
        self.pool[at, 0, offset] = self._slices(k)[:, 0]
        self.pool[at, 1, offset] = self._slices(v)[:, 0]
        return self._decode_attention(q, ids, pos, k.shape[1])

    def _decode_attention(self, q: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """Row b's query over its own keys 0..pos[b], a chunk at a time (split-K, as flash-decoding):
        the chunks the rows have written are gathered one after another, none padded to the longest
        row, so a step costs the batch's summed context (what a paged-attention kernel reads, and
        what the simulator charges), not batch × longest. Padded to the longest, a batch of 32 with
        contexts 8–503 took 4.5× one at their mean (/work/notes/mixed_ctx.py, once). Each chunk's
        attention comes with its log-sum-exp; a row's output is its chunks' outputs weighted by
        exp(lse − the row's largest lse), the exact softmax over all its keys.

        Keys past pos[b] in its last chunk are masked out; they are finite anyway (zeros, or the
        row's own earlier bytes), so no leftover NaN reaches the sums as 0 × NaN."""
        b, heads, _, hd = q.shape
        device = q.device
        live = pos // BLOCK_TOKENS + 1  # chunks row b reads
        row = torch.repeat_interleave(torch.arange(b, device=device), live)  # the row of each chunk read
        chunk = torch.arange(row.numel(), device=device) - (torch.cumsum(live, 0) - live)[row]  # its index in the row
        blocks = self.pool.index_select(0, ids[row, chunk].flatten())  # [chunks·slices, 2, BLOCK_TOKENS, width]
        keys, values = self._heads_major(blocks, row.numel(), 1, kv_heads, hd)  # each [chunks, kv_heads, BLOCK_TOKENS, hd]
        if kv_heads != heads:  # query head h reads KV head h // (heads / kv_heads)
            keys, values = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (keys, values))
        position = chunk[:, None] * BLOCK_TOKENS + torch.arange(BLOCK_TOKENS, device=device)
        mask = torch.zeros(position.shape, dtype=q.dtype, device=device)
        mask.masked_fill_(position > pos[row, None], -math.inf)
        out, lse = _attention_with_lse(q[row], keys, values, mask[:, None, None, :])  # [chunks, heads, 1, hd], [chunks, heads, 1]
        top = torch.full((b, heads, 1), -math.inf, device=device).scatter_reduce_(
            0, row[:, None, None].expand_as(lse), lse, "amax")
        weight = torch.exp(lse - top[row])
        total = torch.zeros(b, heads, 1, device=device).index_add_(0, row, weight)
        summed = torch.zeros(b, heads, 1, hd, device=device).index_add_(0, row, out.float() * weight[..., None])
        return (summed / total[..., None]).to(q.dtype)


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k, v under an additive mask, and each query's log-sum-exp of its scores
    (float32). On CPU, the flash kernel `scaled_dot_product_attention` itself runs, which returns both;
    elsewhere the same in plain float32 operations."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)
        return out, lse
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5 + mask.float()
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype), torch.logsumexp(scores, dim=-1)


class Rotary(nn.Module):
    """cos/sin tables of the HF Llama convention: frequencies repeated over both halves of a head."""

    def __init__(self, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        inv = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv)
        emb = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """x: [B, heads, S, head_dim]."""
        cos, sin = self.cos[step.positions], self.sin[step.positions]
        if step.write_at is not None:  # decode: one position per row
            cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, **factory: Any) -> None:
        super().__init__()
        h, hd, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.q_dim, self.kv_dim = spec.num_heads * hd, spec.num_kv_heads * hd
        self.attn_norm = nn.Parameter(torch.ones(h, **factory))
        self.qkv = nn.Parameter(torch.empty(self.q_dim + 2 * self.kv_dim, h, **factory))
        self.qkv_bias = nn.Parameter(torch.empty(self.q_dim + 2 * self.kv_dim, **factory)) if spec.qkv_bias else None
        self.o = nn.Parameter(torch.empty(h, self.q_dim, **factory))
        self.mlp_norm = nn.Parameter(torch.ones(h, **factory))
        self.gate_up = nn.Parameter(torch.empty(2 * inter, h, **factory))
        self.down = nn.Parameter(torch.empty(h, inter, **factory))

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVStore, layer: int, step: Step) -> torch.Tensor:
        b, s, h = x.shape
        y = F.rms_norm(x, (h,), self.attn_norm, RMS_EPS)
        q, k, v = F.linear(y, self.qkv, self.qkv_bias).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = rope(q.view(b, s, self.heads, self.head_dim).transpose(1, 2), step)
        k = rope(k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2), step)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        out = cache.attend(layer, q, k, v, step)
        x = x + F.linear(out.transpose(1, 2).reshape(b, s, self.q_dim), self.o)
        gate, up = F.linear(F.rms_norm(x, (h,), self.mlp_norm, RMS_EPS), self.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down)


class TorchLlama(nn.Module):
    def __init__(self, spec: ModelSpec, max_len: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        h = spec.hidden_size
        self.embed = nn.Parameter(torch.empty(spec.vocab_size, h, **factory))
        self.layers = nn.ModuleList(Block(spec, **factory) for _ in range(spec.num_layers))
        self.norm = nn.Parameter(torch.ones(h, **factory))
        self.lm_head = None if spec.tied_embeddings else nn.Parameter(torch.empty(spec.vocab_size, h, **factory))
        self.rope = Rotary(spec.head_dim, max_len, dtype, device)
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" not in name:
                p.data.normal_(0.0, INIT_STD, generator=gen)
        self.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, cache: KVStore, step: Step, last: torch.Tensor | None) -> torch.Tensor:
        """Logits at the positions `last` indexes in the flattened [rows × columns] tokens (a prompt's
        last real token; None: each row's final column)."""
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rope, cache, i, step)
        x = x[:, -1] if last is None else x.flatten(0, 1)[last]
        x = F.rms_norm(x, (x.shape[-1],), self.norm, RMS_EPS)
        return F.linear(x, self.embed if self.lm_head is None else self.lm_head)


def green_sms(share_pct: int, total_sms: int, granularity: int = 8) -> int:
    """SMs of a green context for a share: rounded down to the partition granularity (8 SMs from
    compute capability 9.0 on, per the CUDA driver API), at least one granule."""
    return max(granularity, total_sms * share_pct // 100 // granularity * granularity)


def enter_green_context(share_pct: int, device_index: int = 0) -> tuple[Any, torch.cuda.Stream | None, int]:
    """Enter a CUDA green context holding `share_pct` of the device's SMs.

    Returns the context (keep a reference: it lives as long as that), the stream work must be
    queued on (PyTorch ≥ 2.12), or None where this PyTorch (2.10/2.11) instead makes the context
    current for the calling thread, and the number of SMs it got.
    """
    from torch.cuda.green_contexts import GreenContext

    n = green_sms(share_pct, torch.cuda.get_device_properties(device_index).multi_processor_count)
    ctx = GreenContext.create(num_sms=n, device_id=device_index)
    if hasattr(ctx, "Stream"):
        return ctx, ctx.Stream(), n
    ctx.set_context()
    return ctx, None, n


class TorchEngine:
    """The model plus its device, dtype and stream; prefill and decode over rows of a `KVCache`.

    `green_sm_pct`: run every kernel inside a CUDA green context with that share of the SMs (only
    on CUDA, and only where this PyTorch exposes `torch.cuda.green_contexts`).
    """

    def __init__(self, spec: ModelSpec, *, dtype: str = "bfloat16", device: str = "cpu", max_len: int | None = None,
                 seed: int = 0, green_sm_pct: int | None = None) -> None:
        t0 = time.perf_counter()
        if dtype not in DTYPES:
            raise TorchEngineError(f"dtype {dtype!r} not one of {', '.join(DTYPES)}")
        self.spec = spec
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
        self.dtype = DTYPES[dtype]
        self.max_len = max_len or spec.max_context
        self.stream: torch.cuda.Stream | None = None
        self.info: dict[str, str] = {"torch": torch.__version__, "dtype": dtype, "device": str(self.device)}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.info |= {"cuda": str(torch.version.cuda), "device_name": props.name,
                          "sm_count": str(props.multi_processor_count)}
            if green_sm_pct is not None and green_sm_pct < 100:
                self._green, self.stream, n = enter_green_context(green_sm_pct, self.device.index)
                self.info["green_sms"] = str(n)
        with self.on_stream():
            self.model = TorchLlama(spec, self.max_len, self.dtype, self.device, seed)
        self.sync()
        self.import_s = 0.0  # torch was imported with this module, before the clock started
        self.build_s = time.perf_counter() - t0

    @classmethod
    def from_engine_config(cls, config: EngineConfig, device: str, green_sm_pct: int | None = None) -> TorchEngine:
        """The model vLLM would build from the same engine config (its folder's config.json)."""
        if not config.dummy:
            raise TorchEngineError(f"{config.model_dir}: the torch engine runs random weights only (dummy=true)")
        spec = ModelSpec.from_hf_config(config.model_dir)
        return cls(spec, dtype=config.dtype, device=device, max_len=config.max_model_len, seed=config.seed,
                   green_sm_pct=green_sm_pct)

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Inside: kernels go to the engine's stream (its green context's, if it has one)."""
        with torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
            yield

    def sync(self) -> None:
        """Wait for every kernel queued so far (a no-op on CPU, where ops run synchronously)."""
        if self.device.type == "cuda":
            (self.stream or torch.cuda.current_stream(self.device)).synchronize()

    def new_cache(self, slots: int, max_len: int, held: int = 0) -> KVCache:
        """An empty cache, or with `held` > 0 rows that already hold `held` tokens of random keys and
        values (a synthetic context: what decode latency depends on is its length, not its content)."""
        if max_len > self.max_len:
            raise TorchEngineError(f"cache of {max_len} tokens exceeds the engine's {self.max_len}")
        shape = (slots, self.spec.num_kv_heads, max_len, self.spec.head_dim)
        # Zeros, not empty: masked positions get zero attention weight, and 0 × a leftover NaN in
        # uninitialised memory would still be NaN (a test failed that way on a fresh machine).
        with self.on_stream():
            k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.spec.num_layers)]
            v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.spec.num_layers)]
            if held:
                for t in (*k, *v):
                    t.normal_()
        return KVCache(k, v, [held] * slots)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, prompts: torch.Tensor | Sequence[Sequence[int]], start: int = 0) -> torch.Tensor:
        """Prompts into empty rows start.. of `cache`; logits [B, vocab] at each prompt's last token.

        A tensor [B, S] is B prompts of S tokens; a list may hold prompts of different lengths,
        which are right-padded (see the module docstring).
        """
        with self.on_stream():
            if isinstance(prompts, torch.Tensor):
                tokens, lengths, last = prompts.to(self.device), [prompts.shape[1]] * prompts.shape[0], None
            else:
                lengths = [len(p) for p in prompts]
                tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
                for i, p in enumerate(prompts):
                    tokens[i, : len(p)] = torch.as_tensor(p)
                tokens = tokens.to(self.device)
                last = torch.arange(len(lengths), device=self.device) * tokens.shape[1] + torch.as_tensor(
                    lengths, device=self.device) - 1
            rows = self._rows(cache, start, len(lengths))
            if any(cache.lengths[rows]):
                raise TorchEngineError(f"prefill into rows {start}..{rows.stop - 1}, which already hold tokens")
            if max(lengths) > cache.max_len:
                raise TorchEngineError(f"prompt of {max(lengths)} tokens exceeds the cache's {cache.max_len}")
            step = Step(rows, torch.arange(tokens.shape[1], device=self.device))
            logits = self.model(tokens, cache, step, last)
        cache.lengths[rows] = lengths
        return logits

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Append one token per row (tokens: [B]) to rows start..; logits [B, vocab]."""
        rows = self._rows(cache, start, tokens.shape[0])
        held = cache.lengths[rows]
        if min(held) < 1 or max(held) >= cache.max_len:
            raise TorchEngineError(f"decode needs rows holding 1..{cache.max_len - 1} tokens, got {min(held)}..{max(held)}")
        with self.on_stream():
            pos = torch.as_tensor(held, device=self.device)
            if len(set(held)) == 1:
                step = Step(rows, pos, write_at=held[0], n_keys=held[0] + 1)
            else:
                n = max(held) + 1
                mask = (torch.arange(n, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
                step = Step(rows, pos, write_at=pos, n_keys=n, mask=mask)
            logits = self.model(tokens.to(self.device)[:, None], cache, step, None)
        cache.lengths[rows] = [n + 1 for n in held]
        return logits

    def layout(self, block_bytes: int) -> PagedLayout:
        return PagedLayout.of(self.spec, self.dtype.itemsize, block_bytes)

    def pool_view(self, pool: torch.Tensor) -> torch.Tensor:
        """The unit's pool ([blocks, block_bytes] bytes) as this model's blocks, no copy."""
        layout = self.layout(pool.shape[1])
        return pool.view(self.dtype).view(pool.shape[0], 2, BLOCK_TOKENS, layout.width)

    def _paged(self, pool: torch.Tensor, tables: Sequence[Sequence[int]], held: list[int]) -> PagedKV:
        layout = self.layout(pool.shape[1])
        per_chunk = layout.chunk_blocks
        chunks = [len(t) // per_chunk for t in tables]
        if any(len(t) % per_chunk for t in tables):
            raise TorchEngineError(f"block tables must hold whole chunks of {per_chunk} blocks")
        # A decode reads only the chunks its rows have written; past them (a decode run's blocks taken
        # ahead, or a shorter row's padding) a row's table repeats its own first chunk, which holds
        # its own finite keys, so a masked position never reads another request's leftovers.
        live = [min(c, h // BLOCK_TOKENS + 1) for c, h in zip(chunks, held, strict=True)] if any(held) else chunks
        ids = torch.empty(len(tables), max(chunks), per_chunk, dtype=torch.long)
        for i, t in enumerate(tables):
            own = torch.as_tensor(t, dtype=torch.long).view(chunks[i], per_chunk)
            ids[i, : live[i]] = own[: live[i]]
            ids[i, live[i]:] = own[0]
        ids = ids.view(len(tables), max(chunks), layout.num_layers, layout.slices).to(self.device)
        return PagedKV(self.pool_view(pool), ids, chunks, held)

    @torch.inference_mode()
    def prefill_paged(self, pool: torch.Tensor, tables: Sequence[Sequence[int]],
                      prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prompts into the pool blocks of their block tables; logits [B, vocab] at each last token.

        Row b's table must hold its prompt: ⌈len / BLOCK_TOKENS⌉ chunks of `layout().chunk_blocks`.
        The prompts are packed, not padded: their tokens go through the projections and the MLP as one
        sequence, and each attends causally over its own keys, as vLLM's varlen prefill does. So a
        step costs the batch's tokens, which is what the simulator charges (batch × mean length).
        The packed sequence is padded to a multiple of `PAD_TOKENS` (a dummy prompt that attends over
        itself and writes no block): the matrix products then meet one shape per 16 tokens, whose
        CPU kernels are built once, instead of a new one for almost every step of a served trace.
        """
        lengths = [len(p) for p in prompts]
        per_chunk = self.layout(pool.shape[1]).chunk_blocks
        for t, n in zip(tables, lengths, strict=True):
            if -(-n // BLOCK_TOKENS) * per_chunk != len(t):
                raise TorchEngineError(f"a prompt of {n} tokens needs {-(-n // BLOCK_TOKENS)} chunks, its table "
                                       f"has {len(t)} blocks")
        padding = -sum(lengths) % PAD_TOKENS
        with self.on_stream():
            packed = [t for p in prompts for t in p] + [FIRST_TOKEN_ID] * padding
            tokens = torch.as_tensor(packed, dtype=torch.long, device=self.device)[None]
            last = torch.cumsum(torch.as_tensor(lengths, device=self.device), 0) - 1
            lengths += [padding] if padding else []
            positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
            step = Step(slice(0, 1), positions, packed=tuple(lengths))
            return self.model(tokens, self._paged(pool, tables, [0] * len(prompts)), step, last)

    @torch.inference_mode()
    def decode_paged(self, pool: torch.Tensor, tables: Sequence[Sequence[int]], held: Sequence[int],
                     tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (tokens: [B]) at position held[b], appended to its blocks; logits [B, vocab]."""
        held = list(held)
        per_chunk = self.layout(pool.shape[1]).chunk_blocks
        for t, n in zip(tables, held, strict=True):
            if len(t) < (n // BLOCK_TOKENS + 1) * per_chunk:
                raise TorchEngineError(f"decode at position {n} needs {n // BLOCK_TOKENS + 1} chunks, "
                                       f"its table has {len(t) // per_chunk}")
        with self.on_stream():
            pos = torch.as_tensor(held, device=self.device)
            n = max(held) + 1
            mask = None
            if len(set(held)) > 1:
                mask = (torch.arange(n, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
            step = Step(slice(0, len(held)), pos, write_at=pos, n_keys=n, mask=mask)
            return self.model(tokens.to(self.device)[:, None], self._paged(pool, tables, held), step, None)

    @staticmethod
    def _rows(cache: KVCache, start: int, count: int) -> slice:
        if start < 0 or start + count > len(cache.lengths):
            raise TorchEngineError(f"rows {start}..{start + count - 1} outside a cache of {len(cache.lengths)} slots")
        return slice(start, start + count)


class TorchStepEngine:
    """`hwloop.profiler.StepEngine` over a `TorchEngine`.

    A timed step is one forward pass plus greedy sampling and the copy of the sampled tokens to the
    host, which a serving engine needs every step (to stream them, to check stop conditions). So
    it is wall time (`perf_counter`) of a step that ends synchronised; on CUDA the stream is also
    synchronised before the clock starts, so work queued earlier (cache set-up) is not charged to
    it. Eager PyTorch, no CUDA graphs: at small batches kernel launch overhead is part of the time.

    Decode cells start from a synthetic context (random keys and values, no prefill), so a decode
    cell costs only its own steps; the contexts of consecutive steps grow by one, as in the vLLM
    engine. Each new cell shape frees the previous cell's cache first.
    """

    prefill_offsets = PREFILL_OFFSETS  # its prefill cells timed at served-like lengths (`hwloop.profiler`)

    def __init__(self, engine: TorchEngine, seed: int = 0) -> None:
        self.engine = engine
        self.gen = torch.Generator().manual_seed(seed)
        self.shape: tuple[str, int, int] | None = None

    @classmethod
    def for_worker(cls, config: EngineConfig, device: str) -> TorchStepEngine:
        """Built and warmed up in a worker; a share from `GREEN_ENV` runs in a green context."""
        green = os.environ.get(GREEN_ENV)
        step_engine = cls(TorchEngine.from_engine_config(config, device, int(green) if green else None), config.seed)
        step_engine.prefill(1, 16)
        step_engine.decode(1, 16, 2)
        return step_engine

    def _tokens(self, *shape: int) -> torch.Tensor:
        return torch.randint(FIRST_TOKEN_ID, self.engine.spec.vocab_size, shape, generator=self.gen)

    def _cache(self, cell: tuple[str, int, int], slots: int, max_len: int, held: int = 0) -> KVCache:
        """A cache for this cell; on a new cell shape the allocator's cached blocks are released
        first, so cells of very different shapes do not fragment GPU memory into an OOM."""
        if cell != self.shape and self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        self.shape = cell
        return self.engine.new_cache(slots, max_len, held)

    def _timed(self, run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
        self.engine.sync()
        t0 = time.perf_counter()
        with torch.inference_mode(), self.engine.on_stream():
            tokens = run().argmax(dim=-1)
            tokens.cpu()
        return time.perf_counter() - t0, tokens

    def prefill(self, batch: int, seq_len: int) -> float:
        cache = self._cache(("prefill", batch, seq_len), batch, seq_len)
        prompts = self._tokens(batch, seq_len)
        return self._timed(lambda: self.engine.prefill(cache, prompts))[0]

    def decode(self, batch: int, ctx_len: int, steps: int) -> list[float]:
        cache = self._cache(("decode", batch, ctx_len), batch, ctx_len + steps, held=ctx_len)
        tokens = self._tokens(batch)
        times = []
        for _ in range(steps):
            elapsed, tokens = self._timed(lambda t=tokens: self.engine.decode(cache, t))
            times.append(elapsed)
        return times


class PagedStepEngine(TorchStepEngine):
    """The profiler's `StepEngine` over the split workers' paged path (`prefill_paged` /
    `decode_paged`): what a split-mode run's steps cost, gathers included.

    Each cell gets a pool of exactly its blocks, handed out in a shuffled order as a long-running
    pool's free list would; decode contexts are random keys and values, as in `TorchStepEngine`.
    On CPU the pool is shared memory mapped as the split workers map the unit's (`hwloop.kv_pool`):
    a decode step read its blocks 12–14% slower there than from private memory (batches 4 and 32,
    /work/notes/pool_kind.py, once), so a private pool would profile steps the workers never get.
    """

    def _pool(self, cell: tuple[str, int, int], batch: int, tokens: int) -> tuple[torch.Tensor, list[list[int]]]:
        from policies.placement import BLOCK_BYTES, blocks_for_tokens

        if cell != self.shape and self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        self.shape = cell
        per_request = blocks_for_tokens(tokens, self.engine.layout(BLOCK_BYTES).chunk_blocks)
        with self.engine.on_stream():
            if self.engine.device.type == "cpu":
                from hwloop.kv_pool import KVPool, attach

                with KVPool(batch * per_request) as shared:  # the mapping outlives the descriptor
                    pool = attach(shared.handle())
            else:
                pool = torch.empty(batch * per_request, BLOCK_BYTES, dtype=torch.uint8, device=self.engine.device)
            self.engine.pool_view(pool).normal_(generator=None)
        ids = torch.randperm(batch * per_request, generator=self.gen).tolist()
        return pool, [ids[i * per_request:(i + 1) * per_request] for i in range(batch)]

    def prefill(self, batch: int, seq_len: int) -> float:
        pool, tables = self._pool(("prefill", batch, seq_len), batch, seq_len)
        prompts = self._tokens(batch, seq_len).tolist()
        return self._timed(lambda: self.engine.prefill_paged(pool, tables, prompts))[0]

    def decode(self, batch: int, ctx_len: int, steps: int) -> list[float]:
        pool, tables = self._pool(("decode", batch, ctx_len), batch, ctx_len + steps)
        tokens = self._tokens(batch)
        times = []
        for i in range(steps):
            held = [ctx_len + i] * batch
            elapsed, tokens = self._timed(lambda t=tokens, h=held: self.engine.decode_paged(pool, tables, h, t))
            times.append(elapsed)
        return times
