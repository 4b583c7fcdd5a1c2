"""hwloop pieces that need no engine: compute partitioning, engine sizing, decode-run length."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hwloop.engine import STEP_TOKEN_MULTIPLE, engine_config, synthetic_prompt, write_model_dir
from hwloop.partition import (
    ALLOCATOR_ENV,
    MPSDaemon,
    PartitionError,
    assign_cores,
    cores_for_share,
    cpu_env,
    cpu_slices,
    cuda_slices,
    mps_env,
    overlapping,
    worker_share_pct,
)
from policies.placement import BLOCK_TOKENS, LLMPlacement, blocks_per_chunk
from policies.specs import ModelSpec

TINY = ModelSpec("tiny", 2, 128, 2, 2, 344, 1024, max_context=512)


def llm(name: str, decode: int, prefill: int = 100) -> LLMPlacement:
    return LLMPlacement(name, "tiny", 1, prefill, decode, 8)


def test_shares_round_down_to_whole_cores_and_never_to_none() -> None:
    assert [cores_for_share(p, 2) for p in (10, 49, 50, 90, 100)] == [1, 1, 1, 1, 2]
    assert [cores_for_share(p, 8) for p in (10, 30, 50, 100)] == [1, 2, 4, 8]


def test_cores_are_disjoint_while_shares_fit_and_wrap_beyond() -> None:
    assert assign_cores([50, 50], [0, 1]) == [(0,), (1,)]
    sets = assign_cores([50, 40, 30], [4, 5, 6, 7])
    assert sets == [(4, 5), (6,), (7,)]
    wrapped = assign_cores([100, 60], [0, 1])
    assert wrapped == [(0, 1), (0,)] and overlapping(*wrapped)


def test_worker_share_is_the_share_the_policy_launches_at() -> None:
    assert worker_share_pct(llm("a", decode=45), exclusive=False) == 50  # ADBS: whole SM units
    assert worker_share_pct(llm("a", decode=45), exclusive=True) == 100  # temporal: the whole unit


def test_cpu_slices_pin_openmp_to_the_process_cores() -> None:
    a, b = cpu_slices([llm("a", 50), llm("b", 50)], exclusive=False, cores=[0, 1])
    assert (a.cores, b.cores) == ((0,), (1,))
    assert a.env["OMP_NUM_THREADS"] == "1" and a.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert cpu_env([2, 3])["OMP_NUM_THREADS"] == "2"


# A step's worth of tensors, freed and allocated again four times: the minor page faults of the last four.
REALLOCATE = """
import resource
def step():
    return bytearray(48 << 20)  # zero-filled, so every page is touched
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env: dict[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", REALLOCATE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


def test_workers_keep_freed_memory_instead_of_faulting_in_fresh_pages() -> None:
    """A real process: by default glibc maps a large block afresh each time (12,288 faults per 48 MiB),
    with the workers' allocator settings the freed heap is reused (tens of faults)."""
    assert cpu_env([0]).items() >= ALLOCATOR_ENV.items()
    assert _faults({}) > 4 * 10_000
    assert _faults(cpu_env([0])) < 1_000


def test_mps_env_per_worker(tmp_path) -> None:
    env = mps_env(30, [2, 3], tmp_path / "pipe", tmp_path / "log")
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30",
                   "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"),
                   "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log")}
    with pytest.raises(PartitionError):
        mps_env(0, [0], "p", "l")


def test_cuda_slices_point_every_client_at_the_runners_own_daemon(tmp_path) -> None:
    daemon = MPSDaemon(tmp_path)  # not started: only its folders are read
    a, b = cuda_slices([llm("a", 40), llm("b", 70)], exclusive=False, gpus=[0], daemon=daemon)
    assert a.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert b.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "70"
    assert a.env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "pipe") == daemon.env["CUDA_MPS_PIPE_DIRECTORY"]
    bare = cuda_slices([llm("a", 40)], exclusive=False, gpus=[1], daemon=None)[0]
    assert bare.env == {"CUDA_VISIBLE_DEVICES": "1"}


def test_mps_daemon_without_the_driver_tools_fails_clearly(tmp_path) -> None:
    daemon = MPSDaemon(tmp_path, control="no-such-mps-control")
    with pytest.raises(PartitionError, match="no-such-mps-control not found"):
        daemon.start()
    daemon.stop()  # idempotent, safe in cleanup paths


def test_engine_holds_what_the_pool_can_hand_out_and_a_whole_prompt_per_step(tmp_path) -> None:
    chunk = blocks_per_chunk(TINY)
    cfg = engine_config(TINY, tmp_path, max_batch=4, pool_blocks=100 * chunk, chunk_blocks=chunk,
                        prefill_tokens=2048)
    assert cfg.kv_blocks == 4 * TINY.max_context // BLOCK_TOKENS  # batch cap binds before the pool
    assert cfg.max_batched_tokens == 2048 + 4
    small = engine_config(TINY, tmp_path, max_batch=4, pool_blocks=3 * chunk, chunk_blocks=chunk,
                          prefill_tokens=0)
    assert small.kv_blocks == TINY.max_context // BLOCK_TOKENS  # vLLM needs one full-length request
    # vLLM's null block, and room for the prompt that pads a step (hwloop.engine.STEP_TOKEN_MULTIPLE):
    # a sequence, its tokens and its blocks beyond what the policy may admit
    args = small.engine_args()
    assert args["num_gpu_blocks_override"] == small.kv_blocks + 1 + -(-(STEP_TOKEN_MULTIPLE - 1) // BLOCK_TOKENS)
    assert args["max_num_seqs"] == 4 + 1 and args["max_num_batched_tokens"] == small.max_batched_tokens + 31


def test_model_folder_holds_the_specs_config(tmp_path) -> None:
    import json

    path = write_model_dir(TINY, tmp_path)
    assert write_model_dir(TINY, tmp_path) == path
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 1024


def test_synthetic_prompts_stay_in_vocab_and_differ() -> None:
    a, b = synthetic_prompt(1, 64, 1024), synthetic_prompt(2, 64, 1024)
    assert a != b and all(3 <= t < 1024 for t in a + b)


@pytest.mark.parametrize("contexts,max_steps,chunks", [
    ([1], 100, 0), ([32], 100, 1), ([33, 64, 100], 200, 2), ([5, 6, 7, 8], 40, 3), ([31, 32], 3, 0),
    ([10, 200, 64, 65], 500, 7), ([1, 2], 1, 0),
])
def test_decode_runs_stop_before_the_kv_they_cannot_have(contexts: list[int], max_steps: int, chunks: int) -> None:
    from policies.ledger import steps_within_kv
    from policies.placement import blocks_for_tokens

    def grown(s: int) -> int:  # chunks held at step s beyond those of step 0
        return sum(blocks_for_tokens(c + s, 1) - blocks_for_tokens(c, 1) for c in contexts)

    brute = next((s for s in range(1, max_steps) if grown(s) > chunks), max_steps)
    assert steps_within_kv(contexts, [max_steps] * len(contexts), max_steps, chunks) == brute
