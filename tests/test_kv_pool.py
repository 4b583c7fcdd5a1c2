"""The unit's paged KV pool (hwloop.kv_pool) and paged attention in the torch engine, in one process:
block ids, the block layout of models of different shapes, and paged steps against the engine's
own contiguous cache (fp32: greedy tokens identical, logits within fp32 tolerance; bf16: logits
within a few bf16 steps, tokens parting only at a near-tie)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hwloop.kv_pool import PAD_TOKENS, BlockAllocator, KVPool, PagedLayout, PoolError, attach
from hwloop.torch_engine import TorchEngine
from policies.placement import blocks_for_tokens, blocks_per_chunk
from policies.specs import ModelSpec

# Two shapes in fp32 (dtype_bytes=4: a block holds 64 elements of one layer's K and V per token).
WIDE = ModelSpec("wide", 2, 128, 4, 2, 344, 512, dtype_bytes=4, max_context=256)  # GQA, head_dim 32
DEEP = ModelSpec("deep", 3, 192, 3, 3, 256, 384, dtype_bytes=4, max_context=256)  # head_dim 64
TOL = {"rtol": 1e-4, "atol": 1e-4}


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_layout_counts_the_simulators_blocks() -> None:
    for spec in (WIDE, DEEP, ModelSpec("llama-ish", 4, 512, 4, 4, 1024, 1000)):
        layout = PagedLayout.of(spec, spec.dtype_bytes)
        assert layout.chunk_blocks == blocks_per_chunk(spec)
    one_head = PagedLayout.of(ModelSpec("h128", 1, 128, 1, 1, 64, 100), 2)
    assert (one_head.slices, one_head.width) == (1, 128)  # one layer × one 128-wide head per block
    with pytest.raises(PoolError, match="dtype"):
        PagedLayout.of(WIDE, 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=60))
def test_allocator_alone_owns_the_count(ops: list[tuple[bool, int]]) -> None:
    pool = BlockAllocator(20)
    held: list[list[int]] = []
    for take, n in ops:
        if take:
            if pool.can_allocate(n):
                held.append(pool.allocate(n))
            else:
                with pytest.raises(PoolError):
                    pool.allocate(n)
        elif held:
            pool.deallocate(held.pop(n % len(held)))
        ids = [i for h in held for i in h]
        assert len(ids) == len(set(ids)) and pool.free + len(ids) == 20
    for h in held:
        pool.deallocate(h)
    assert pool.free == pool.total
    with pytest.raises(PoolError, match="not allocated"):
        pool.deallocate([0])


def test_pool_that_does_not_fit_is_refused_in_one_line() -> None:
    with pytest.raises(PoolError, match=r"does not fit: .* GiB host memory available") as e:
        KVPool(1 << 40)  # 16 PiB
    assert "\n" not in str(e.value)


def test_pool_has_no_name_in_dev_shm_and_is_shared() -> None:
    before = set(os.listdir("/dev/shm"))
    with KVPool(8) as pool:
        a, b = pool.tensor(), attach(pool.handle())
        a[3, 100] = 42
        assert int(b[3, 100]) == 42  # two mappings of the same pages
        assert set(os.listdir("/dev/shm")) == before


def run_paged(engine: TorchEngine, pool: torch.Tensor, alloc: BlockAllocator, prompts: list[list[int]],
              steps: int) -> tuple[list[list[int]], list[torch.Tensor], list[list[int]]]:
    """Greedy: paged prefill, then `steps` paged decodes, growing each table as a runner would."""
    chunk = engine.layout(pool.shape[1]).chunk_blocks
    tables = [alloc.allocate(blocks_for_tokens(len(p), chunk)) for p in prompts]
    logits = [engine.prefill_paged(pool, tables, prompts)]
    out = [[int(t)] for t in logits[0].argmax(-1)]
    held = [len(p) for p in prompts]
    for _ in range(steps):
        for t, n in zip(tables, held, strict=True):
            t += alloc.allocate(blocks_for_tokens(n + 1, chunk) - len(t))
        logits.append(engine.decode_paged(pool, tables, held, torch.tensor([o[-1] for o in out])))
        for o, t in zip(out, logits[-1].argmax(-1), strict=True):
            o.append(int(t))
        held = [n + 1 for n in held]
    return out, logits, tables


def run_contiguous(engine: TorchEngine, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    cache = engine.new_cache(len(prompts), 256)
    logits = [engine.prefill(cache, prompts)]
    out = [[int(t)] for t in logits[0].argmax(-1)]
    for _ in range(steps):
        logits.append(engine.decode(cache, torch.tensor([o[-1] for o in out])))
        for o, t in zip(out, logits[-1].argmax(-1), strict=True):
            o.append(int(t))
    return out, logits


def test_two_shapes_share_one_pool_and_match_the_contiguous_engine() -> None:
    """Interleaved steps of two models in one pool, unequal lengths crossing block boundaries."""
    with KVPool(600) as handle:
        pool = handle.tensor()
        pool.fill_(255)  # every unwritten byte NaN in fp32: masked leftovers must not leak
        alloc = BlockAllocator(600)
        for spec, lengths in ((WIDE, (5, 31, 33)), (DEEP, (40, 9)), (WIDE, (64, 1))):
            engine = TorchEngine(spec, dtype="float32", seed=3)
            prompts = [prompt(n, seed=n, vocab=spec.vocab_size) for n in lengths]
            paged, paged_logits, tables = run_paged(engine, pool, alloc, prompts, steps=36)
            plain, plain_logits = run_contiguous(engine, prompts, steps=36)
            assert paged == plain
            for a, b in zip(paged_logits, plain_logits, strict=True):
                torch.testing.assert_close(a, b, **TOL)
            assert all(len(t) == blocks_for_tokens(n + 36, blocks_per_chunk(spec)) for t, n in zip(tables, lengths, strict=True))
        assert alloc.free < 600


def test_bf16_logits_match_and_tokens_part_only_at_a_near_tie() -> None:
    """In bf16 the paged path (attention over gathered blocks, chunk by chunk) and the contiguous one
    round differently: logits within a few bf16 steps of each other (2⁻⁸ of their scale), so greedy
    tokens must agree wherever the contiguous engine's top two logits are further apart than the two
    paths can differ, and may part at a near-tie, after which the rows' inputs differ and are not
    compared. (Exact tokens over 10 steps held on the project's AMD EPYC machines; on an Intel Xeon
    the second prompt's 4th token parted at a margin of one bf16 step, 0.0039, the logits 0.0078 apart
    at most.) The fp32 test above asks for identical tokens."""
    spec = ModelSpec("bf", 2, 256, 4, 2, 512, 300, max_context=256)  # head_dim 64: two heads per block
    engine = TorchEngine(spec, dtype="bfloat16", seed=5)
    with KVPool(200) as handle:
        prompts = [prompt(n, seed=n, vocab=spec.vocab_size) for n in (12, 35)]
        paged, paged_logits, _ = run_paged(engine, handle.tensor(), BlockAllocator(200), prompts, steps=10)
    plain, plain_logits = run_contiguous(engine, prompts, steps=10)
    for row in range(len(prompts)):
        for step, (a, b) in enumerate(zip(paged_logits, plain_logits, strict=True)):
            a, b = a[row].float(), b[row].float()
            tol = 4 * 2**-8 * float(b.abs().max())  # four bf16 steps at the logits' scale
            torch.testing.assert_close(a, b, rtol=0, atol=tol)
            if paged[row][step] != plain[row][step]:
                top = b.topk(2).values
                assert float(top[0] - top[1]) <= 2 * tol, (row, step, top)
                break


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 12)), max_size=60))
def test_block_id_pool_gives_each_block_to_one_request(ops: list[tuple[int, int]]) -> None:
    """The ledger's pool with ids: tables disjoint, as long as the counts, and free + held = total."""
    from hwloop.kv_pool import BlockIdPool
    from policies.view import Request

    pool = BlockIdPool(40, ["a", "b"])
    requests = [Request(i, "ab"[i % 2], 0.0, 10, 10) for i in range(6)]
    for i, blocks in ops:
        r = requests[i]
        if blocks - r.blocks > pool.free:
            with pytest.raises(PoolError):
                pool.resize(r, blocks)
            continue
        pool.resize(r, blocks)
        ids = [b for t in pool.tables.values() for b in t]
        assert len(ids) == len(set(ids)) and pool.free + len(ids) == 40
        assert all(len(pool.table(x.request_id)) == x.blocks for x in requests)
        assert pool.used == {n: sum(x.blocks for x in requests if x.llm == n) for n in "ab"}
    for r in requests:
        pool.release(r)
    assert pool.free == 40 and not pool.tables


def test_paged_bench_times_mixed_batches_against_uniform_ones_at_their_mean() -> None:
    """`python -m hwloop.bench_paged` runs the mixed-length steps the split workers serve (a padded or
    crashing kernel shows up here) and pairs each with a uniform batch of the same size at its mean."""
    from hwloop.bench_paged import MODEL, bench

    table = bench(TorchEngine(MODEL, max_len=MODEL.max_context), repeats=1)
    assert set(table.phase) == {"prefill", "decode"}
    assert (table.longest > table["mean"]).all() and (table.mixed_ms > 0).all() and (table.uniform_ms > 0).all()
    assert (table.ratio - table.mixed_ms / table.uniform_ms).abs().max() < 1e-9


def test_a_paged_prefill_is_padded_to_the_kernels_row_block_and_writes_only_its_prompts_blocks() -> None:
    """The packed prompts (9 + 30 tokens) reach the layers as 48 rows (`PAD_TOKENS`), so a served
    trace builds kernels for one row count per 16 tokens; the padding writes no pool block and
    the prompts' logits are the contiguous engine's."""
    engine = TorchEngine(WIDE, dtype="float32", seed=5)
    rows: list[int] = []
    engine.model.layers[0].register_forward_pre_hook(lambda _module, args: rows.append(args[0].shape[1]))
    prompts = [prompt(9, 1, WIDE.vocab_size), prompt(30, 2, WIDE.vocab_size)]
    with KVPool(64) as handle:
        pool = handle.tensor()
        pool.fill_(7)
        chunk = engine.layout(pool.shape[1]).chunk_blocks
        tables = [list(range(0, chunk)), list(range(chunk, 2 * chunk))]  # one chunk each
        logits = engine.prefill_paged(pool, tables, prompts)
        assert rows == [48] and 48 % PAD_TOKENS == 0
        assert bool((pool[2 * chunk:] == 7).all()) and not bool((pool[:2 * chunk] == 7).all())
    _, plain = run_contiguous(engine, prompts, steps=0)
    torch.testing.assert_close(logits, plain[0], **TOL)
