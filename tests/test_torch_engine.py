"""The plain-PyTorch engine (hwloop.torch_engine) on CPU with tiny Llama shapes: its KV cache, its
batching and padding, its agreement with transformers' LlamaForCausalLM, and the profiler command
that runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hwloop.profiler import Grid
from hwloop.torch_engine import TorchEngine, TorchEngineError, TorchStepEngine, green_sms
from policies.cost import TableCostModel
from policies.specs import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
# GQA (4 query heads over 2 KV heads) so the grouped path is the one tested.
TINY = ModelSpec("tiny", 2, 128, 4, 2, 344, 512, max_context=256)
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return TorchEngine(TINY, dtype="float32", seed=1)


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def recompute(engine: TorchEngine, seq: torch.Tensor) -> torch.Tensor:
    """Logits after the whole sequence, computed from scratch in a fresh cache."""
    return engine.prefill(engine.new_cache(1, len(seq)), seq[None])[0]


def test_decode_after_prefill_matches_full_recompute(engine: TorchEngine) -> None:
    seq = tokens(24)
    cache = engine.new_cache(1, 32)
    logits = engine.prefill(cache, seq[None, :16])[0]
    torch.testing.assert_close(logits, recompute(engine, seq[:16]), **TOL)
    for i in range(16, 24):
        logits = engine.decode(cache, seq[i : i + 1])[0]
        torch.testing.assert_close(logits, recompute(engine, seq[: i + 1]), **TOL)
    assert cache.lengths == [24] and logits.abs().max() > 1e-3  # not trivially zero


def test_batched_equals_unbatched_with_unequal_lengths(engine: TorchEngine) -> None:
    """Right-padded prefill, then decode steps whose rows hold different lengths (masked keys)."""
    prompts = [tokens(n, seed=n).tolist() for n in (5, 11, 8)]
    cache = engine.new_cache(4, 32)  # row 0 stays empty: the batch runs on rows 1..3
    batched = [engine.prefill(cache, prompts, start=1)]
    nxt = [tokens(3, seed=100 + k) for k in range(3)]
    batched += [engine.decode(cache, t, start=1) for t in nxt]
    assert cache.lengths == [0, 8, 14, 11]
    for i, prompt in enumerate(prompts):
        alone = engine.new_cache(1, 32)
        steps = [engine.prefill(alone, [prompt])[0]] + [engine.decode(alone, t[i : i + 1])[0] for t in nxt]
        for b, a in zip(batched, steps, strict=True):
            torch.testing.assert_close(b[i], a, **TOL)


def test_bfloat16_tracks_float32(engine: TorchEngine) -> None:
    low = TorchEngine(TINY, dtype="bfloat16", seed=1)
    seq = tokens(12)
    ref, got = recompute(engine, seq), recompute(low, seq).float()
    assert low.model.embed.dtype == torch.bfloat16
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_cache_misuse_is_refused(engine: TorchEngine) -> None:
    cache = engine.new_cache(2, 8)
    engine.prefill(cache, tokens(8)[None])
    with pytest.raises(TorchEngineError, match="already hold"):
        engine.prefill(cache, tokens(4)[None])
    with pytest.raises(TorchEngineError, match="decode needs"):
        engine.decode(cache, tokens(1))  # row 0 is full
    with pytest.raises(TorchEngineError, match="outside a cache"):
        engine.decode(cache, tokens(3))
    with pytest.raises(TorchEngineError, match="dtype"):
        TorchEngine(TINY, dtype="int8")


def test_matches_transformers_llama(engine: TorchEngine) -> None:
    """Same weights in LlamaForCausalLM: same logits, so the architecture is Llama's (RoPE
    convention, GQA, SwiGLU, RMSNorm), not merely self-consistent."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY.to_hf_config())).float().eval()
    ours = engine.model
    q, kv = TINY.num_heads * TINY.head_dim, TINY.num_kv_heads * TINY.head_dim
    state = {"model.embed_tokens.weight": ours.embed, "model.norm.weight": ours.norm, "lm_head.weight": ours.lm_head}
    for i, blk in enumerate(ours.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = blk.qkv.split([q, kv, kv])
        gate, up = blk.gate_up.chunk(2)
        state |= {p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                  p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": blk.o,
                  p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": blk.down,
                  p + "input_layernorm.weight": blk.attn_norm, p + "post_attention_layernorm.weight": blk.mlp_norm}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    seq = tokens(20)
    with torch.no_grad():
        ref = hf(seq[None]).logits[0]
    cache = engine.new_cache(1, 32)
    torch.testing.assert_close(engine.prefill(cache, seq[None, :12])[0], ref[11], **TOL)
    for i in range(12, 20):
        torch.testing.assert_close(engine.decode(cache, seq[i : i + 1])[0], ref[i], **TOL)


def test_step_engine_times_steps_of_the_asked_shape(engine: TorchEngine) -> None:
    steps = TorchStepEngine(engine)
    assert steps.prefill(2, 16) > 0
    times = steps.decode(3, 20, 4)
    assert len(times) == 4 and min(times) > 0


def test_green_context_share_rounds_down_to_whole_granules() -> None:
    assert green_sms(100, 132) == 128 and green_sms(30, 132) == 32 and green_sms(5, 132) == 8


def test_grid_caps_skip_cells_that_do_not_fit() -> None:
    grid = Grid(batches=(1, 64), seq_lens=(32, 512), sm_pcts=(100,), warmup=1, repeats=2,
                max_prefill_tokens=4096, max_kv_tokens=8192)
    cells = {(c.phase, c.batch, c.seq_len) for c in grid.cells()}
    assert ("prefill", 64, 512) not in cells and ("decode", 64, 512) not in cells
    assert ("decode", 64, 32) in cells and ("prefill", 1, 512) in cells and len(cells) == 6


def test_profile_command_with_the_torch_engine(tmp_path: Path) -> None:
    """`python -m experiments.profile engine=torch` writes a table the cost model reads."""
    out = tmp_path / "torch.csv"
    cmd = [sys.executable, "-m", "experiments.profile", "engine=torch", f"out={out}", "grid.batches=[1,2]",
           "grid.seq_lens=[16,32]", "grid.sm_pcts=[100]", "grid.warmup=1", "grid.repeats=2", "spec.num_layers=2",
           "spec.hidden_size=64", "spec.intermediate_size=172", f"hydra.run.dir={tmp_path / 'hydra'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    cost = TableCostModel.from_profile(out)
    spec = ModelSpec("tiny-llama", 2, 64, 4, 4, 172, 1024)
    assert cost.prefill_time(spec, 1, 100, 2, 24) > 0 and cost.decode_time(spec, 1, 100, 1, 16) > 0
    meta = (tmp_path / "torch.meta.json").read_text()
    assert '"engine": "torch"' in meta and '"torch":' in meta


def paused(pid: int, within_s: float = 5.0) -> bool:
    """Is the process stopped (state T)? SIGSTOP is delivered asynchronously, so wait for it a little."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return True
        time.sleep(0.01)
    return False


def test_profile_workers_time_the_grid_again_on_the_same_processes(tmp_path: Path) -> None:
    """`ProfileWorkers` (a validation's rechecks): the first `measure` starts one worker per share
    group, later ones reuse them (same processes, same cells), paused in between (SIGSTOP: no CPU
    taken from the engines a validation times), and `close` stops every one, paused or not."""
    from hwloop.profiler import ProfileWorkers

    spec = ModelSpec("tiny-llama", 2, 64, 4, 4, 172, 1024)
    cores = sorted(os.sched_getaffinity(0))[:2]
    grid = Grid(batches=(1, 2), seq_lens=(16,), sm_pcts=(50, 100) if len(cores) == 2 else (100,), warmup=1, repeats=2)
    with ProfileWorkers(spec, grid, backend="torch", cores=cores, work_dir=tmp_path) as workers:
        first = workers.measure().table
        procs = [w.proc for w in workers._workers.values()]
        assert len(procs) == len(cores) and all(p is not None and p.poll() is None for p in procs)
        assert all(paused(p.pid) for p in procs)
        again = workers.measure().table
        assert [w.proc for w in workers._workers.values()] == procs
        keys = ["sm_pct", "phase", "batch", "seq_len"]
        assert first[keys].equals(again[keys]) and (again["latency_ms"] > 0).all()
    assert all(p.poll() is not None for p in procs) and not workers._workers


def test_a_prefill_cell_times_lengths_around_its_own_each_once_built(engine: TorchEngine) -> None:
    """Served prompts are rarely a multiple of 16 tokens, where the CPU kernels' row blocks fit
    exactly: a prefill cell's timed repeats run at odd offsets around its length (centred on it),
    each length run once untimed just before, so no repeat times a first build of its shape."""
    from hwloop.profiler import PREFILL_OFFSETS, prefill_lengths, time_cell
    from hwloop.worker import ProfileCmd

    class Recorded(TorchStepEngine):
        def __init__(self) -> None:
            super().__init__(engine)
            self.calls: list[tuple[int, int, float]] = []

        def prefill(self, batch: int, seq_len: int) -> float:
            self.calls.append((batch, seq_len, elapsed := super().prefill(batch, seq_len)))
            return elapsed

    stepper = Recorded()
    samples = time_cell(stepper, ProfileCmd("prefill", 2, 64, warmup=1, repeats=6))
    lengths = prefill_lengths(64, 6)
    assert lengths == [64 + k for k in PREFILL_OFFSETS] and sum(lengths) == 6 * 64 and 64 not in lengths
    assert all(n % 2 for n in lengths)  # never a multiple of 2, let alone of 16
    assert [n for _, n, _ in stepper.calls] == [64] + [n for n in lengths for _ in range(2)]
    assert samples == tuple(t for _, _, t in stepper.calls[2::2])  # the second run of each length
    assert prefill_lengths(1, 3) == [2, 1, 4]  # never below one token
    from hwloop.profiler import VLLMStepEngine

    assert not getattr(VLLMStepEngine, "prefill_offsets", ())  # vLLM's cells keep their own length (profiler)
