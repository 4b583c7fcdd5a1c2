"""MuxServe's split execution on real processes: prefill and decode workers of two LLMs of different
shapes sharing one KV pool (hwloop.kv_pool, hwloop.split_worker), and the split-mode runner
(hwloop.split_runner) executing ADBS on them."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hwloop.kv_pool import BlockAllocator, KVPool
from hwloop.process import WorkerError
from hwloop.replay import RunnerConfig, RunnerError
from hwloop.split_runner import SplitRunner
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
from policies.batching import make_batching
from policies.placement import LLMPlacement, Placement, Unit, blocks_for_tokens, blocks_per_chunk
from policies.records import read_records
from policies.specs import ModelSpec
from tests.hw_helpers import assert_job_log_matches, interrupt_replay
from traces.schema import Workload

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


def left_in_dev_shm(before: set[str], pids: list[int]) -> set[str]:
    """Entries added to /dev/shm since `before` by this test's processes: torch and vLLM name theirs
    after the creating pid, ours would say muxsim. (Other jobs on a shared machine add their own.)"""
    keys = ["muxsim", str(os.getpid()), *(str(p) for p in pids)]
    return {name for name in dev_shm() - before if any(k in name for k in keys)}


def maps_pool(pid: int) -> bool:
    """Does process `pid` map the pool, as the anonymous memfd (no /dev/shm path)?"""
    with open(f"/proc/{pid}/maps") as f:
        return any("/memfd:muxsim-kv-pool" in line for line in f)


def hand_off(spec: ModelSpec, tokens: tuple[int, ...], pre: SplitWorkerHandle, dec: SplitWorkerHandle, pool: KVPool,
             alloc: BlockAllocator, steps: int = 20) -> list[int]:
    """One request prefilled by `pre` into pool blocks, then decoded `steps` tokens by `dec` from the
    same blocks: the prefill writes only its blocks, in the runner's own view of the pool; the
    decode command is a table and a token, not the KV; the prompt's K and V stay as written. Returns
    the request's tokens, the prefill's first."""
    view = pool.tensor()
    chunk = blocks_per_chunk(spec)
    table = alloc.allocate(blocks_for_tokens(len(tokens), chunk))
    before = view.clone()
    pre.send(PrefillCmd((PrefillItem(7, tokens, tuple(table)),)))
    done: PhaseDone = pre.recv(120)
    changed = (view != before).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(table)  # the prefill wrote its blocks, in place, only those
    written = view[table].clone()
    # The handoff: the block table and one token, not the KV.
    table += alloc.allocate(blocks_for_tokens(len(tokens) + steps, chunk) - len(table))
    cmd = DecodeCmd((DecodeItem(7, done.new_tokens[7][0], len(tokens), tuple(table), steps),), max_steps=steps)
    assert len(pickle.dumps(cmd)) < blocks_for_tokens(len(tokens), chunk) * pool.block_bytes / 20
    dec.send(cmd)
    out: PhaseDone = dec.recv(120)
    assert out.steps == steps and out.finished == (7,)
    # Decode appended after the prompt; the prompt's K and V are untouched in the same blocks.
    prompt_blocks = table[: blocks_for_tokens(32, chunk)]  # the first, full chunk
    assert torch.equal(view[prompt_blocks], written[: len(prompt_blocks)])
    return [*done.new_tokens[7], *out.new_tokens[7]]


def test_two_llms_share_one_pool_with_zero_copy_handoff(tmp_path: Path) -> None:
    """Two shapes, each with a prefill and a decode process, on one pool; the decode process reads
    the blocks the prefill process wrote, through the block table, and gives the single-process
    engine's tokens."""
    shm = dev_shm()
    with KVPool(400) as pool:
        alloc = BlockAllocator(400)
        handles = [start(pool, spec, phase, CORES[i % len(CORES)], tmp_path)
                   for i, (spec, phase) in enumerate((s, p) for s in (WIDE, DEEP) for p in ("prefill", "decode"))]
        try:
            readies = [h.wait_ready(120) for h in handles]
            # Every worker maps the runner's memfd itself: one storage, four mappings.
            assert {r.pool_identity for r in readies} == {pool.identity()}
            assert all(maps_pool(r.pid) for r in readies)
            for spec, (pre, dec) in zip((WIDE, DEEP), (handles[:2], handles[2:]), strict=True):
                tokens = prompt(45, seed=len(spec.name), vocab=spec.vocab_size)
                assert hand_off(spec, tokens, pre, dec, pool, alloc) == greedy_alone(spec, tokens, 20)
        finally:
            for h in handles:
                h.stop()
    assert left_in_dev_shm(shm, [r.pid for r in readies]) == set()


def test_workers_on_a_shared_core_start_one_after_another(tmp_path: Path) -> None:
    """`start_workers`: a worker pinned to a core an earlier worker holds is started only once that
    one is ready (two builds on one core spin their threads against each other); one on another
    core starts at once."""
    import psutil

    from hwloop.process import start_workers

    def handle(name: str, core: int) -> SplitWorkerHandle:
        return SplitWorkerHandle(SplitWorkerSpec(name, WIDE.name, "decode", WIDE, pool.handle(), dtype="float32",  # type: ignore[arg-type]
                                                 cores=(core,), env={"OMP_NUM_THREADS": "1"}), tmp_path / f"{name}.log")

    with KVPool(64) as pool:
        first, second, other = handle("first", CORES[0]), handle("second", CORES[0]), handle("other", CORES[-1])
        try:
            readies = start_workers([first, second, other], timeout_s=120)
            created = [psutil.Process(r.pid).create_time() for r in readies]
        finally:
            for h in (first, second, other):
                h.stop()
    assert created[1] >= created[0] + readies[0].import_s  # after the first had imported torch at least
    if len(CORES) > 1:
        assert abs(created[2] - created[0]) < readies[0].import_s  # beside the first, not after it


def test_kill_9_of_a_worker_leaves_nothing_in_dev_shm(tmp_path: Path) -> None:
    shm = dev_shm()
    with KVPool(64) as pool:
        h = start(pool, WIDE, "decode", CORES[0], tmp_path)
        try:
            h.wait_ready(120)
            assert h.proc is not None and maps_pool(h.proc.pid)
            os.kill(h.proc.pid, signal.SIGKILL)
            h.proc.wait(10)
            with pytest.raises(WorkerError, match="killed by SIGKILL"):
                h.send(DecodeCmd(()))
                h.recv(10)
        finally:
            h.stop()
        assert left_in_dev_shm(shm, [h.proc.pid]) == set()
    assert left_in_dev_shm(shm, [h.proc.pid]) == set()


# ---- the split-mode runner ------------------------------------------------------------------------

SPECS = {"wide": WIDE, "deep": DEEP}


def workload(n: int, span_s: float, seed: int = 0, prompts: tuple[int, int] = (8, 90),
             outputs: tuple[int, int] = (1, 40)) -> Workload:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "request_id": np.arange(n),
        "model": [("llm-wide", "llm-deep")[i % 2] for i in range(n)],
        "arrival_s": np.sort(rng.uniform(0, span_s, n)),
        "prompt_tokens": rng.integers(*prompts, n),
        "output_tokens": rng.integers(*outputs, n),
    })
    return Workload(df)


def placement(kv_blocks: int, prefill_sm: int = 50, decode_sm: int = 50) -> Placement:
    llms = (LLMPlacement("llm-wide", "wide", 1, prefill_sm, decode_sm, 8, rate=2.0),
            LLMPlacement("llm-deep", "deep", 1, prefill_sm, decode_sm, 8, rate=2.0))
    return Placement("test", (Unit(0, 0, (0,), llms, kv_blocks=kv_blocks),))


def two_cores() -> dict[int, tuple[int, ...]]:
    if len(CORES) < 2:
        pytest.skip("needs 2 CPU cores")
    return {0: CORES[:2]}


def test_split_runner_records_every_request_once_and_returns_every_block(tmp_path: Path) -> None:
    """ADBS split launches on four processes; a pool small enough to preempt. Every request recorded
    exactly once, the pool's free count back at its total, prefill and decode of one LLM overlapping."""
    wl = workload(40, 4.0, prompts=(8, 40), outputs=(1, 120))
    shm = dev_shm()
    runner = SplitRunner(wl, placement(kv_blocks=90), make_batching("adbs", quota_period_s=1.0), SPECS,
                         RunnerConfig(gpu_cores=two_cores(), records_path=tmp_path / "r.parquet",
                                      work_dir=tmp_path / "work", log_jobs=True))
    result = runner.run()
    rec = read_records(tmp_path / "r.parquet")
    assert sorted(rec["request_id"]) == list(range(40))
    assert_job_log_matches(result.jobs, result.stats, by=["llm", "phase"])
    assert (rec["status"] == "finished").all(), rec[rec["status"] != "finished"]
    assert result.stats["kv_free_end"] == result.stats["kv_total"] == {0: 90}
    assert result.stats["anomalies"] == []
    workers = result.stats["workers"]
    assert workers["llm-wide/prefill"]["cores"] != workers["llm-wide/decode"]["cores"]
    assert result.stats["prefills"] > 0 and result.stats["steps"] > result.stats["prefills"]
    # Jobs ran at once: one LLM's prefill beside its own decode, and beside the other LLM's jobs.
    assert result.stats["sent_beside_own_other_phase"] > 0 and result.stats["sent_beside_other_llm"] > 0
    assert result.stats["preemptions"] > 0  # the pool is small enough that decodes outgrow it (4-5 measured)
    assert all(h.proc is not None and h.proc.poll() is not None for h in runner.workers)
    assert left_in_dev_shm(shm, [h.proc.pid for h in runner.workers if h.proc]) == set()


def test_shares_the_cores_cannot_honour_are_refused_before_any_process(tmp_path: Path) -> None:
    with pytest.raises(RunnerError, match=r"llm-wide decode: a 30% share of 2 core\(s\) is 0.6 of a core") as e:
        SplitRunner(workload(4, 1.0), placement(64, decode_sm=30), make_batching("adbs"), SPECS,
                    RunnerConfig(gpu_cores=two_cores(), work_dir=tmp_path))
    assert "\n" not in str(e.value) and not (tmp_path / "logs").exists()
    with pytest.raises(RunnerError, match="does not fit"):
        SplitRunner(workload(4, 1.0), placement(1 << 36), make_batching("adbs"), SPECS,
                    RunnerConfig(gpu_cores=two_cores(), work_dir=tmp_path))


def test_kill_9_of_a_worker_mid_run_saves_records_and_returns_blocks(tmp_path: Path) -> None:
    wl = workload(30, 3.0, seed=1)
    shm = dev_shm()
    runner = SplitRunner(wl, placement(kv_blocks=14 * 60), make_batching("adbs"), SPECS,
                         RunnerConfig(gpu_cores=two_cores(), records_path=tmp_path / "r.parquet",
                                      work_dir=tmp_path / "work"))

    def kill_soon() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if runner.stats.get("steps", 0) >= 3 and runner.workers:
                victim = next(h for h in runner.workers if h.name == "llm-deep/decode")
                if victim.proc is not None:
                    os.kill(victim.proc.pid, signal.SIGKILL)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with pytest.raises(WorkerError, match="llm-deep/decode"):
        runner.run()
    killer.join()
    rec = read_records(tmp_path / "r.parquet")
    assert sorted(rec["request_id"]) == list(range(30))  # finished or failed, each exactly once
    failed = rec[rec["status"] == "failed"]
    assert len(failed) and failed["reason"].str.contains("worker failed").all()
    assert runner.stats["kv_free_end"] == runner.stats["kv_total"]
    assert all(h.proc is not None and h.proc.poll() is not None for h in runner.workers)
    assert left_in_dev_shm(shm, [h.proc.pid for h in runner.workers if h.proc]) == set()


def replay_until_stopped(folder: str) -> None:
    """Run in a child interpreter by the signal test: a long replay that prints its progress."""
    config = RunnerConfig(records_path=Path(folder) / "records.parquet", work_dir=folder, gpu_cores=two_cores(),
                          progress=lambda t: print(f"progress {t:.1f}", flush=True))
    SplitRunner(workload(60, 60.0, seed=2), placement(kv_blocks=400), make_batching("adbs"), SPECS, config).run()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_reap_every_worker_and_keep_the_records(tmp_path: Path, sig: signal.Signals) -> None:
    interrupt_replay(__file__, "replay_until_stopped", tmp_path, sig, workers=4, requests=60)  # 2 processes per LLM


def short_split_validation(tmp_path: Path, recheck: str) -> list[str]:
    """`experiments.validate` overrides for a short split run: one tiny LLM on two cores, two loads,
    two repeats. Profile batches reach 64: the run's decodes reach 30-60, and a line through batches
    1 and 4 alone, extended that far, once came out at zero time (a noisy batch-4 cell), so the job
    report's ratios were infinite (fresh-clone CI, 2026-12-03 21:39)."""
    cores = two_cores()[0]
    return ["mode=split", f"cores=[{cores[0]},{cores[1]}]", "systems=[muxserve]", "workload.rates=[6.0]",
            "shapes=[{name:tiny-l4-h512,num_layers:4,hidden_size:512,num_heads:8,num_kv_heads:8,"
            "intermediate_size:1376,vocab_size:1024,max_context:512}]",
            "workload.duration_s=4", "workload.prompt_mean=32", "workload.output_mean=12", "split_pool_mib=64",
            f"profile.dir={tmp_path / 'profiles'}", "profile.batches=[1,4,64]", "profile.seq_lens=[8,64]",
            "profile.warmup=1", "profile.repeats=2", f"profile.recheck={recheck}", "profile.terms=[turns]",
            "report.progress=false", "report.plot=false", "report.slo_scales=[2,5]", "load.levels=2",
            "load.lowest=0.3", "load.highest=0.5", "load.repeats=2"]


def test_validate_runs_muxserve_in_split_mode_against_the_simulator(tmp_path: Path) -> None:
    """`python -m experiments.validate mode=split`, short: one LLM on two cores (its prefill and its
    decode process one core each), a profile of the paged engine at one and two cores, MuxServe's
    placement at whole-core shares, the simulator in split mode with per-phase core slices, and the
    same placement on split workers, charged the split workers' measured turns; two load levels, two
    hardware repeats each, run in rounds. The profile's cells are timed again before every hardware
    run and at the end, and each run is simulated again at the speed its two checks measured
    (`profile.recheck=each_repeat`). Every record set complete; accuracy is what the
    README reports, not asserted here (timings on a shared 2-core machine vary with its load)."""
    from hydra import compose, initialize_config_dir

    from experiments.validate import CONF_DIR, incomplete, validate

    cores = two_cores()[0]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="validate", overrides=short_split_validation(tmp_path, "each_repeat"))
    v = validate(cfg, tmp_path / "out")
    light, c = v.comparisons
    for comparison in v.comparisons:
        for records in (comparison.sim, *comparison.hw, *comparison.sim_at_speed):
            assert incomplete(records, comparison.workload) == []
            assert (records["status"] == "finished").all()
    # The repeats run in rounds (level 0, level 1, level 0, level 1), a check before each and one at
    # the end: each repeat is judged at the speed measured by the check before it and the next.
    assert [light.brackets, c.brackets] == [[0, 2], [1, 3]] and len(c.sim_at_speed) == 2
    for speed in c.speed:
        assert 0.3 < speed["factor"] < 5 and {f["phase"] for f in speed["factors"]} == {"prefill", "decode"}
    assert v.drift is not None and len(v.drift["cells"]) == 8  # batches 1 and 4 × 2 phases × 2 core counts
    thr = v.rows.set_index(["level", "metric"]).loc[(1, "throughput_rps")]
    assert thr["sim_at_speed"] > 0 and abs(thr["error_at_speed"]) < 1 and thr["noise_at_speed"] >= 0
    for hw in c.stats["hw"]:
        assert hw["mode"] == "split" and hw["anomalies"] == [] and hw["kv_free_end"] == hw["kv_total"]
    # Per-phase core slices: prefill on the first core; decode on the second, or on both where the
    # measured profile made a whole-unit decode share the better placement (it depends on the timings).
    assert c.slices["llm-0/prefill"] == (cores[0],) and set(c.slices) == {"llm-0/prefill", "llm-0/decode"}
    assert c.slices["llm-0/decode"][0] == cores[1] and set(c.slices["llm-0/decode"]) <= set(cores)
    model = cfg.shapes[0].name  # its turns measured on the split workers (hwloop.terms.SplitPair), at 1 and 2 cores
    assert v.terms is not None and set(v.terms.turn_s) == {(model, 1), (model, 2)}
    assert c.placement.units[0].kv_blocks == 64 * 2**20 // 16384
    assert set(v.rows["metric"]) >= {"throughput_rps", "ttft_p50_s", "tpot_p50_s"}
    # The run folder read back job by job (`python -m experiments.job_report`): every job of every log,
    # against the run's own profile, the first job of each worker never after an earlier one.
    from experiments.job_report import job_ratios, job_table

    jobs = job_ratios(tmp_path / "out")
    logged = sum(len(pd.read_parquet(f)) for f in (tmp_path / "out").glob("jobs_*.parquet"))
    assert len(jobs) == logged and set(jobs["executor"]) == {"sim", "hw"} and set(jobs["repeat"]) == {-1, 0, 1}
    assert (jobs["ratio"] > 0).all() and np.isfinite(jobs["ratio"]).all()
    first = jobs.groupby(["system", "level", "executor", "repeat", "unit", "llm", "phase"]).head(1)
    assert first["idle_ms"].isna().all() and not first["seen"].any()
    table = job_table(jobs, "prefill")
    assert set(table.columns.get_level_values("executor")) == {"sim", "hw"}
    assert table.xs("size", axis=1, level=0).sum().sum() == int((jobs["admitted"] > 0).sum())
    # One hardware run's prefill jobs replayed on fresh split workers (`python -m experiments.job_replay`):
    # every job once, in its order, beside the run's decode jobs replayed too, each charged what the
    # simulator's terms add under the replay's own timeline (here the turns only: at least the profile).
    from experiments.config import ConfigError
    from experiments.job_replay import logged_run, replay, summary

    logged = logged_run(tmp_path / "out", level=1, repeat=0)
    assert len(logged.jobs) == int(((jobs["executor"] == "hw") & (jobs["level"] == 1) & (jobs["repeat"] == 0)
                                        & (jobs["phase"] == "prefill")).sum()) > 0
    assert all(sum(x.lengths) == x.admitted_context and len(x.lengths) == x.admitted for x in logged.jobs.itertuples())
    replays = {c: replay(logged, c) for c in ("back-to-back", "with-decodes")}
    for jobs_replayed in replays.values():
        assert list(jobs_replayed["start_s"]) == list(logged.jobs["start_s"])
        assert (jobs_replayed["measured_s"] > 0).all() and (jobs_replayed["charged_s"] >= jobs_replayed["profiled_s"]).all()
        assert (jobs_replayed["sent_s"].diff().dropna() > 0).all()  # one after another, as the worker takes them
    assert len(replays["with-decodes"].attrs["decode_spans"]) == len(logged.decodes) > 0
    back_to_back = replays["back-to-back"]
    assert (back_to_back["sent_s"].iloc[1:].to_numpy() >= back_to_back["ended_s"].iloc[:-1].to_numpy()).all()
    table = summary(replays, logged)
    assert set(table.index.get_level_values("condition")) == {"the run (logged)", "back-to-back", "with-decodes"}
    assert set(table.index.get_level_values("jobs")) == {"admitting"}
    assert (table["charged ÷ profile"] >= 1).all()  # the run itself too, charged from its logged timeline
    with pytest.raises(ConfigError, match="a split-mode run replays under"):
        replay(logged, "bogus")
    with pytest.raises(ConfigError, match="no hardware run at level 5"):
        logged_run(tmp_path / "out", level=5, repeat=0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_validate_stops_on_a_signal_in_one_line_and_leaves_no_worker(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C or SIGTERM while `experiments.validate` profiles on split workers: it exits with 128 + the
    signal, says so in one line naming its folder (no traceback), and no worker process it started
    is left."""
    import subprocess
    import sys

    import psutil

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.validate", "mode=split", "systems=[muxserve]",
           f"profile.dir={tmp_path / 'profiles'}", "profile.batches=[1,4]", "profile.seq_lens=[8,64]",
           "report.progress=false", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        workers: list[psutil.Process] = []
        while not workers and proc.poll() is None:  # a worker started: the profile is being measured
            assert time.monotonic() < deadline
            workers = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.05)
        if not workers:
            pytest.fail(f"validate exited ({proc.returncode}) before starting a worker: {proc.stderr.read()[-2000:]}")
        time.sleep(1.0)
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"interrupted ({sig.name})"), err[-2000:]
    assert str(out) in err.strip().splitlines()[-1]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert workers and not alive


def test_validate_stopped_after_a_hardware_run_reports_the_runs_that_finished(tmp_path: Path) -> None:
    """SIGTERM once a hardware run has finished: `experiments.validate` writes the report of the
    finished runs (validation.md marked interrupted, summary.csv and summary.json), says so in one
    line, exits with 143 and leaves no worker."""
    import json
    import re
    import subprocess
    import sys

    import psutil

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.validate", *short_split_validation(tmp_path, "ends"), f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "jobs_muxserve_L0_hw0.parquet").exists() and proc.poll() is None:  # written last
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)  # the run counted; the next one starting
        if proc.poll() is not None:
            pytest.fail(f"validate exited ({proc.returncode}) before a hardware run finished: {proc.stderr.read()[-2000:]}")
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    done = re.fullmatch(r"interrupted \(SIGTERM\) after (\d) of 4 hardware runs: (.+) reports the runs that finished", last)
    assert done and "Traceback" not in err and done[2] == str(out / "validation.md"), err[-2000:]
    runs = int(done[1])
    assert 1 <= runs < 4
    assert (out / "validation.md").read_text().startswith(f"**Interrupted** (SIGTERM) after {runs} of 4 hardware runs")
    rows = pd.read_csv(out / "summary.csv")
    assert 0 in set(rows["level"]) and (rows["repeats"] >= 1).all()
    assert rows.groupby(["level", "system"])["repeats"].first().sum() == runs  # each finished run counted once
    assert json.loads((out / "summary.json").read_text())["interrupted"] == f"after {runs} of 4 hardware runs"
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
