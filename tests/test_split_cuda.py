"""MuxServe's split execution on an NVIDIA GPU: the unit's KV pool is one CUDA tensor that every
prefill and decode worker opens through its CUDA IPC handle, each worker an MPS client at its share.

These need a CUDA build of torch and a GPU, so they are skipped on CPU machines (CI); on a GPU
machine run `python -m pytest tests/test_split_cuda.py`. Without the driver's MPS tools the workers
share the GPU unpartitioned, and the pool is still checked. The CPU versions of the same checks are
in tests/test_split.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hwloop.kv_pool import BlockAllocator, KVPool
from hwloop.partition import MPS_CONTROL, MPSDaemon, gpu_slice
from hwloop.replay import RunnerConfig
from hwloop.split_runner import SplitRunner
from hwloop.split_worker import (
    SplitWorkerHandle,
    SplitWorkerSpec,
)
from hwloop.torch_engine import TorchEngine
from policies.batching import make_batching
from policies.records import read_records
from policies.specs import ModelSpec
from tests.test_split import DEEP, SPECS, WIDE, hand_off, placement, prompt, workload

pytestmark = pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch and an NVIDIA GPU")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MPSDaemon | None]:
    """This process becomes a client of the workers' MPS daemon before it touches CUDA (CUDA IPC
    works between clients of one server); None where the MPS tools are missing."""
    mps = MPSDaemon(tmp_path_factory.mktemp("mps")) if shutil.which(MPS_CONTROL) else None
    if mps is not None:
        mps.start()
        os.environ.update(mps.env)
    try:
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device visible")
        yield mps
    finally:
        if mps is not None:
            mps.stop()


def worst_pick(spec: ModelSpec, prompt_tokens: tuple[int, ...], picked: list[int]) -> float:
    """How far below the single-process engine's best logit each token the split workers picked
    lies, fed the same history (the workers' own tokens): 0 when every pick is its argmax.

    The reference runs on the CPU, in fp32, with the GPU workers' weights (a CUDA generator draws
    other numbers than the CPU's): on CPU the paged path gives its tokens exactly
    (tests/test_split.py). Against the contiguous engine on the H200 itself, whose fp32 attention
    kernel is another, a pick was 0.087 below the best logit (cause not established), so that is
    not the yardstick. Teacher-forced, so a near-tie broken the other way costs only its margin."""
    gpu = TorchEngine(spec, dtype="float32", device="cuda", seed=0)
    engine = TorchEngine(spec, dtype="float32", device="cpu", seed=0)
    engine.model.load_state_dict({k: v.cpu() for k, v in gpu.model.state_dict().items()})
    cache = engine.new_cache(1, 256)
    logits = engine.prefill(cache, [list(prompt_tokens)]).flatten()
    worst = 0.0
    for i, token in enumerate(picked):
        worst = max(worst, float(logits.max() - logits[token]))
        if i + 1 < len(picked):
            logits = engine.decode(cache, torch.tensor([token])).flatten()
    return worst


def test_two_llms_share_one_cuda_pool_with_zero_copy_handoff(tmp_path: Path, daemon: MPSDaemon | None) -> None:
    """Four MPS clients (a prefill and a decode per shape) open the runner's pool tensor; the prefill's
    KV appears in the runner's own tensor, in place and only in its blocks, and the decode reads it
    through the block table and picks the single-process engine's greedy tokens."""
    with KVPool(400, "cuda") as pool:
        alloc = BlockAllocator(400)
        handles = []
        for spec in (WIDE, DEEP):
            for phase, share in (("prefill", 60), ("decode", 40)):
                sl = gpu_slice(share, (0,), daemon)
                h = SplitWorkerHandle(SplitWorkerSpec(f"{spec.name}/{phase}", spec.name, phase, spec, pool.handle(),  # type: ignore[arg-type]
                                                      dtype="float32", device="cuda", env=sl.env),
                                      tmp_path / f"{spec.name}-{phase}.log")
                h.start()
                handles.append(h)
        try:
            for h in handles:
                h.wait_ready(300)
            for spec, (pre, dec) in zip((WIDE, DEEP), (handles[:2], handles[2:]), strict=True):
                tokens = prompt(45, seed=len(spec.name), vocab=spec.vocab_size)
                picked = hand_off(spec, tokens, pre, dec, pool, alloc)
                # Each token is the single-process engine's greedy choice, to fp32 rounding (a fraction of
                # the top-two margins, 0.006-0.23 on these random weights).
                assert (worst := worst_pick(spec, tokens, picked)) < 1e-4, worst
        finally:
            for h in handles:
                h.stop()


def test_split_runner_on_the_gpu_records_every_request_once_and_returns_every_block(
        tmp_path: Path, daemon: MPSDaemon | None) -> None:
    """ADBS split launches on four MPS clients of the caller's daemon, a pool small enough to preempt."""
    wl = workload(40, 4.0, prompts=(8, 40), outputs=(1, 120))
    runner = SplitRunner(wl, placement(kv_blocks=90, prefill_sm=60, decode_sm=40),
                         make_batching("adbs", quota_period_s=1.0), SPECS,
                         RunnerConfig(device="cuda", mps=daemon, use_mps=daemon is not None,
                                      records_path=tmp_path / "r.parquet", work_dir=tmp_path / "work"))
    result = runner.run()
    rec = read_records(tmp_path / "r.parquet")
    assert sorted(rec["request_id"]) == list(range(40))
    assert (rec["status"] == "finished").all(), rec[rec["status"] != "finished"]
    assert result.stats["kv_free_end"] == result.stats["kv_total"] == {0: 90}
    assert result.stats["anomalies"] == []
    assert result.stats["sent_beside_own_other_phase"] > 0 and result.stats["sent_beside_other_llm"] > 0
    if daemon is not None:
        assert daemon.running  # the caller's daemon outlives the run
    assert all(h.proc is not None and h.proc.poll() is not None for h in runner.workers)
