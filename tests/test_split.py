"""MuxServe's split execution on real processes: prefill and decode workers of two LLMs of different
shapes sharing one KV pool (hwloop.kv_pool, hwloop.split_worker), and the split-mode runner
(hwloop.split_runner) executing ADBS on them."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest
import torch

from hwloop.kv_pool import BlockAllocator, KVPool
from hwloop.split_worker import (
    DecodeCmd,
    DecodeItem,
    PhaseDone,
    PrefillCmd,
    PrefillItem,
    SplitWorkerHandle,
    SplitWorkerSpec,
)
from hwloop.torch_engine import TorchEngine
from hwloop.worker import WorkerError
from policies.placement import blocks_for_tokens, blocks_per_chunk
from policies.specs import ModelSpec

WIDE = ModelSpec("wide", 2, 128, 4, 2, 344, 512, dtype_bytes=4, max_context=256)  # GQA, head_dim 32
DEEP = ModelSpec("deep", 3, 192, 3, 3, 256, 384, dtype_bytes=4, max_context=256)  # head_dim 64
CORES = tuple(sorted(os.sched_getaffinity(0)))


def prompt(n: int, seed: int, vocab: int) -> tuple[int, ...]:
    return tuple(torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


def greedy_alone(spec: ModelSpec, tokens: tuple[int, ...], steps: int) -> list[int]:
    """The single-process engine with its own contiguous cache: the tokens the split workers must give."""
    engine = TorchEngine(spec, dtype="float32", seed=0)
    cache = engine.new_cache(1, 256)
    out = [int(engine.prefill(cache, [list(tokens)]).argmax(-1))]
    for _ in range(steps):
        out.append(int(engine.decode(cache, torch.tensor(out[-1:])).argmax(-1)))
    return out


def start(pool: KVPool, spec: ModelSpec, phase: str, core: int, tmp: Path) -> SplitWorkerHandle:
    name = f"{spec.name}/{phase}"
    h = SplitWorkerHandle(SplitWorkerSpec(name, spec.name, phase, spec, pool.handle(), dtype="float32",  # type: ignore[arg-type]
                                          cores=(core,), env={"OMP_NUM_THREADS": "1"}),
                          tmp / f"{spec.name}-{phase}.log")
    h.start()
    return h


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def test_two_llms_share_one_pool_with_zero_copy_handoff(tmp_path: Path) -> None:
    """Two shapes, each with a prefill and a decode process, on one pool; the decode process reads
    the blocks the prefill process wrote, through the block table, and gives the single-process
    engine's tokens."""
    shm = dev_shm()
    with KVPool(400) as pool:
        view = pool.tensor()
        alloc = BlockAllocator(400)
        handles = [start(pool, spec, phase, CORES[i % len(CORES)], tmp_path)
                   for i, (spec, phase) in enumerate((s, p) for s in (WIDE, DEEP) for p in ("prefill", "decode"))]
        try:
            readies = [h.wait_ready(120) for h in handles]
            # Every worker maps the runner's memfd itself: one storage, four mappings.
            assert {r.pool_identity for r in readies} == {pool.identity()}
            for spec, (pre, dec) in zip((WIDE, DEEP), (handles[:2], handles[2:]), strict=True):
                chunk = blocks_per_chunk(spec)
                tokens = prompt(45, seed=len(spec.name), vocab=spec.vocab_size)
                table = alloc.allocate(blocks_for_tokens(len(tokens), chunk))
                before = view.clone()
                pre.send(PrefillCmd((PrefillItem(7, tokens, tuple(table)),)))
                done: PhaseDone = pre.recv(60)
                changed = (view != before).any(dim=1).nonzero().flatten().tolist()
                assert changed and set(changed) <= set(table)  # the prefill wrote its blocks, in place, only those
                written = view[table].clone()
                # The handoff: the block table and one token, not the KV.
                table += alloc.allocate(blocks_for_tokens(len(tokens) + 20, chunk) - len(table))
                cmd = DecodeCmd((DecodeItem(7, done.new_tokens[7][0], len(tokens), tuple(table), 20),), max_steps=20)
                kv_bytes = blocks_for_tokens(len(tokens), chunk) * pool.block_bytes
                assert len(pickle.dumps(cmd)) < kv_bytes / 20
                dec.send(cmd)
                out: PhaseDone = dec.recv(60)
                assert out.steps == 20 and out.finished == (7,)
                assert [*done.new_tokens[7], *out.new_tokens[7]] == greedy_alone(spec, tokens, 20)
                # Decode appended after the prompt; the prompt's K and V are untouched in the same blocks.
                prompt_blocks = table[: blocks_for_tokens(32, chunk)]  # the first, full chunk
                assert torch.equal(view[prompt_blocks], written[: len(prompt_blocks)])
        finally:
            for h in handles:
                h.stop()
    assert dev_shm() <= shm


def test_kill_9_of_a_worker_leaves_nothing_in_dev_shm(tmp_path: Path) -> None:
    shm = dev_shm()
    with KVPool(64) as pool:
        h = start(pool, WIDE, "decode", CORES[0], tmp_path)
        try:
            h.wait_ready(120)
            assert h.proc is not None
            os.kill(h.proc.pid, signal.SIGKILL)
            h.proc.wait(10)
            with pytest.raises(WorkerError, match="killed by SIGKILL"):
                h.send(DecodeCmd(()))
                h.recv(10)
        finally:
            h.stop()
        assert dev_shm() <= shm
    assert dev_shm() <= shm
