"""The hardware loop on real vLLM engines (CPU, a tiny Llama with dummy weights): no mocks.

Each test starts real engine processes (about 10–30 s on a 2-core machine, most of it importing
vLLM), so there are few of them and their traces are short.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hwloop.engine import engine_config, write_model_dir
from hwloop.partition import cpu_env
from hwloop.process import WorkerError, Yield, start_workers
from hwloop.runner import Runner, RunnerConfig
from hwloop.worker import Admit, StepCmd, StepDone, WorkerHandle, WorkerSpec
from policies.batching import make_batching
from policies.placement import LLMPlacement, Placement, Unit, blocks_per_chunk
from policies.records import RECORD_COLUMNS, read_records
from policies.specs import ModelSpec
from tests.hw_helpers import assert_job_log_matches, interrupt_replay
from traces.schema import Workload

pytest.importorskip("vllm")
pytestmark = [pytest.mark.hw, pytest.mark.slow, pytest.mark.timeout(300)]

TINY = ModelSpec("tiny", 2, 128, 2, 2, 344, 1024, max_context=512)
SPECS = {"tiny": TINY}
CHUNK = blocks_per_chunk(TINY)


def workload(n: int, span_s: float, seed: int = 0, too_long: bool = False) -> Workload:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "request_id": np.arange(n),
        "model": [f"llm{i % 2}" for i in range(n)],
        "arrival_s": np.sort(rng.uniform(0, span_s, n)),
        "prompt_tokens": rng.integers(16, 200, n),
        "output_tokens": rng.integers(4, 40, n),
    })
    if too_long:
        df.loc[n - 1, ["prompt_tokens", "output_tokens"]] = [500, 100]  # > the 512-token context
    return Workload(df)


def placement(decode_sm: tuple[int, int] = (50, 50)) -> Placement:
    llms = tuple(LLMPlacement(f"llm{i}", "tiny", 1, 100, sm, 8, rate=1.0) for i, sm in enumerate(decode_sm))
    return Placement("test", (Unit(0, 0, (0,), llms, kv_blocks=64 * CHUNK * 16),))


def two_cores() -> dict[int, tuple[int, ...]]:
    cores = tuple(sorted(os.sched_getaffinity(0)))
    if len(cores) < 2:
        pytest.skip("needs 2 CPU cores")
    return {0: cores[:2]}


def assert_all_reaped(runner: Runner) -> None:
    assert runner.workers and all(h.proc is not None and h.proc.poll() is not None for h in runner.workers)


def test_worker_runs_exactly_the_launched_steps_and_recomputes_after_preemption(tmp_path: Path) -> None:
    core = min(os.sched_getaffinity(0))
    cfg = engine_config(TINY, write_model_dir(TINY, tmp_path), max_batch=4, pool_blocks=512 * CHUNK,
                        chunk_blocks=CHUNK, prefill_tokens=1024)
    worker = WorkerHandle(WorkerSpec("w", cfg, (core,), cpu_env((core,))), tmp_path / "w.log")
    try:
        (ready,) = start_workers([worker], timeout_s=240)
        assert ready.cores == (core,) and ready.torch_threads == 1

        def step(*admit: Admit, preempt: tuple[int, ...] = ()) -> StepDone:
            worker.send(StepCmd(admit, preempt))
            done = worker.recv(timeout_s=60)
            assert done.anomalies == () and done.t_end > done.t_start
            return done

        first = step(Admit(1, 40, 40, 3), Admit(2, 70, 70, 5))
        assert first.tokens == {1: 1, 2: 1}  # both prefilled in one step, one token each
        step()
        assert step().finished == (1,)  # request 1: 3 tokens, in 3 steps
        step(preempt=(2,))  # nothing left running: the step is empty
        again = step(Admit(2, 70, 73, 2))  # recompute prompt + the 3 tokens generated before
        assert again.tokens == {2: 1}
        assert step().finished == (2,)
        step(Admit(4, 40, 40, 10))
        worker.send(StepCmd((), max_steps=20))
        run = worker.recv(timeout_s=60)
        assert (run.steps, run.tokens, run.finished, run.anomalies) == (9, {4: 9}, (4,), ())  # ends at the finish
        step(Admit(5, 40, 40, 50))
        worker.send(StepCmd((), max_steps=40))
        worker.send(Yield())  # stops the run after the step in progress
        run = worker.recv(timeout_s=60)
        assert run.steps < 40 and run.tokens == {5: run.steps} and run.anomalies == ()
        worker.send(StepCmd((Admit(3, 30, 31, 1),), preempt=(5,)))  # context that does not match: reported
        assert worker.recv(timeout_s=60).anomalies
    finally:
        worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0


def test_replay_of_two_llms_under_adbs_records_every_request(tmp_path: Path) -> None:
    wl = workload(30, span_s=10.0, too_long=True)
    runner = Runner(wl, placement(), make_batching("adbs"), SPECS,
                    RunnerConfig(records_path=tmp_path / "records.parquet", work_dir=tmp_path,
                                 gpu_cores=two_cores(), log_jobs=True))
    result = runner.run()
    assert_all_reaped(runner)
    assert_job_log_matches(result.jobs, result.stats, by=["llm"])
    assert result.stats["speed_probe_ms"]["n"] >= 5  # sampled twice a second over the replay
    rec = read_records(tmp_path / "records.parquet")
    assert tuple(rec.columns) == RECORD_COLUMNS
    assert sorted(rec.request_id) == list(range(30))
    failed = rec[rec.status == "failed"]
    assert list(failed.request_id) == [29] and "exceeds tiny context 512" in failed.reason.iloc[0]
    ok = rec[rec.status == "finished"]
    assert (ok.reason == "").all() and (ok.unit == 0).all() and (ok.preemptions == 0).all()
    assert (ok.arrival_s <= ok.first_token_s).all() and (ok.first_token_s <= ok.finish_s).all()
    assert result.stats["anomalies"] == [] and result.stats["steps"] > result.stats["decisions"] / 2
    workers = result.stats["workers"]
    assert {tuple(w["cores"]) for w in workers.values()} == {(c,) for c in two_cores()[0]}  # 50% = 1 core


def test_a_killed_worker_stops_the_run_with_its_name_and_every_record_saved(tmp_path: Path) -> None:
    wl = workload(40, span_s=20.0, seed=1)
    # Both LLMs get work at t=0, so the engines must take turns from the start; with arrivals
    # spread out, turn-taking could happen only in the last second and the kill would miss it.
    wl = Workload(wl.df.assign(arrival_s=np.where(wl.df.index < 10, 0.0, wl.df.arrival_s)))
    replaying = threading.Event()
    # 100% + 20% of 2 cores: cores (0, 1) and (0,), which overlap, so the two engines take turns.
    runner = Runner(wl, placement((100, 20)), make_batching("adbs"), SPECS,
                    RunnerConfig(records_path=tmp_path / "records.parquet", work_dir=tmp_path,
                                 gpu_cores=two_cores(),
                                 progress=lambda t: runner.stats["deferred_launches"] > 0 and replaying.set()))
    errors: list[BaseException] = []

    def target() -> None:
        try:
            runner.run()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    assert replaying.wait(timeout=240), "the engines never had to take turns"
    victim = runner.workers[1]
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], WorkerError)
    message = str(errors[0])
    assert "'llm1'" in message and "SIGKILL" in message
    assert_all_reaped(runner)
    assert runner.stats["anomalies"] == []
    rec = read_records(tmp_path / "records.parquet")
    assert sorted(rec.request_id) == list(range(40))
    failed = rec[rec.status == "failed"]
    assert len(failed) > 0 and failed.reason.str.contains("llm1").all()


def replay_until_killed(folder: str) -> None:
    """Run in a child interpreter by the SIGTERM test: a long replay that prints its progress."""
    wl = workload(60, span_s=60.0, seed=2)
    config = RunnerConfig(records_path=Path(folder) / "records.parquet", work_dir=folder,
                          gpu_cores=two_cores(), progress=lambda t: print(f"progress {t:.1f}", flush=True))
    Runner(wl, placement(), make_batching("fcfs"), SPECS, config).run()


def test_sigterm_saves_records_and_leaves_no_engine_behind(tmp_path: Path) -> None:
    interrupt_replay(__file__, "replay_until_killed", tmp_path, signal.SIGTERM, workers=2, requests=60)


def test_profile_table_is_what_the_cost_model_reads(tmp_path: Path) -> None:
    from hwloop.profiler import Grid, profile, read_profile, write_profile
    from policies.cost import TableCostModel

    grid = Grid(batches=(1, 2), seq_lens=(32, 64), sm_pcts=(50, 100), warmup=1, repeats=2)
    result = profile(TINY, grid, cores=two_cores()[0], work_dir=tmp_path)
    t = result.table
    assert len(t) == 2 * 2 * 2 * 2 and (t.latency_ms > 0).all() and (t.repeats == 2).all()
    assert (t.min_ms <= t.latency_ms).all() and (t.latency_ms <= t.max_ms).all()
    assert result.meta["share_groups"] == {"1": [50], "2": [100]}
    assert result.meta["versions"]["vllm"] and result.meta["host"]["cpu_count"]
    assert result.meta["speed_probe_ms"]["n"] > 0 and result.meta["speed_probe_ms"]["median"] > 0
    assert 0 <= result.meta["retimed_cells"] <= len(t)
    for suffix in (".parquet", ".csv"):
        path = write_profile(result, tmp_path / f"profile{suffix}")
        assert read_profile(path).meta["command"]
        cost = TableCostModel.from_profile(path)
        assert cost.decode_time(TINY, 1, 100, 2, 48) > 0 and cost.prefill_time(TINY, 1, 50, 1, 32) > 0


# Runs in its own process: a vLLM engine in the test process would keep its distributed state.
PADDED_STEPS = r"""
import json, os, sys
from pathlib import Path
from hwloop.engine import VLLMEngine, engine_config, synthetic_prompt, write_model_dir
from policies.specs import ModelSpec

os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
spec = ModelSpec("tiny", 2, 128, 2, 2, 344, 1024, max_context=128)
engine = VLLMEngine(engine_config(spec, write_model_dir(spec, sys.argv[1]), max_batch=4, pool_blocks=10**6,
                                  chunk_blocks=1, prefill_tokens=256))
model = engine._engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model
ran = []  # the tokens each forward pass really embeds
model.model.embed_tokens.register_forward_hook(lambda module, args, out: ran.append(int(args[0].shape[0])))

def jit_mappings():  # oneDNN's built kernels live in anonymous writable and executable mappings
    return sum(line.split()[1] == "rwxp" for line in Path("/proc/self/maps").read_text().splitlines())

def step(prompts, max_tokens=3):
    for key, n in prompts.items():
        engine.add(key, synthetic_prompt(len(key) * 97 + n, n, spec.vocab_size), max_tokens)
    outputs = engine.step()
    return {"ran": ran[-1], "counted": engine.last_step_tokens, "keys": sorted(o.key for o in outputs)}

out = {"prefill": step({"a": 45, "b": 7}), "decode": step({}), "mixed": step({"c": 30})}
before = jit_mappings()
step({"cold": 77}, 1)
out["cold_builds"] = jit_mappings() - before
engine.warm_shapes()
before = jit_mappings()
for n in (5, 33, 61, 90, 126, 17, 64, 99):
    step({f"w{n}": n, f"v{n}": 127 - n // 2}, 2)
    while engine.has_work():
        engine.step()
out["warm_builds"] = jit_mappings() - before
print(json.dumps(out))
"""


def test_a_step_that_prefills_runs_padded_and_a_warmed_engine_builds_nothing(tmp_path: Path) -> None:
    """`hwloop.engine`: a step that prefills runs a multiple of STEP_TOKEN_MULTIPLE tokens, as the
    model itself sees them (a hook on its embedding), the padding prompt's output never returned;
    a decode runs unpadded. A cold engine builds kernels for a token count it never ran (new
    executable mappings), and after `warm_shapes` serving prompts of many lengths builds none."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PADDED_STEPS, str(tmp_path)], capture_output=True, text=True,
                          timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["prefill"] == {"ran": 64, "counted": 64, "keys": ["a", "b"]}  # 45 + 7 tokens, padded
    assert out["decode"] == {"ran": 2, "counted": 2, "keys": ["a", "b"]}
    assert out["mixed"] == {"ran": 32, "counted": 32, "keys": ["a", "b", "c"]}  # 2 decodes + 30: no padding
    assert out["cold_builds"] > 0
    assert out["warm_builds"] == 0, out
