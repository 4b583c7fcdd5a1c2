"""Overhead of the hardware runner against a bare vLLM engine on the same requests.

    python -m hwloop.bench                 # 1-core and 2-core engines, prints a table
    python -m hwloop.bench --cores 1 --requests 32 --json out.json
    python -m hwloop.bench --step-by-step  # also the runner without decode runs (a round trip per step)
    python -m hwloop.bench --startup 1 2   # worker start-up: 1 worker, then 2 at once, one core each
    python -m hwloop.bench --alternate --env GOMP_SPINCOUNT=300000  # two engines taking turns on 2 cores

For each core count and round it replays one batch of requests (all arriving at t=0, one LLM,
ADBS in mixed mode) through the runner, then feeds the same requests to a bare in-process
`LLMEngine` with the same engine configuration, pinned the same way, stepping it back to back (in a
child process, so it gets a fresh pinned interpreter too). With `--step-by-step` each round also
replays them with `decode_runs=False`: every step is then a decision and a round trip to the
worker, as it is whenever two engines of a unit have work. It reports, as medians over rounds:
- throughput (output tokens/s) of both and their ratio (target ≥ 95%);
- busy fraction: the share of the makespan spent inside engine steps. On a machine shared with
  other processes the steps themselves vary by ±10% from run to run, which swamps the runner's
  cost in the throughput ratio; the busy fractions isolate it;
- the runner's decision time per policy call, wall and CPU (view + decide + launch; target ≤ 0.5 ms)
  and its overhead per step (the makespan not inside engine steps, per step).

`--alternate` pins two engines to the same cores (all of them) and times decode steps of one
engine alone, then of both taking turns step by step, as the temporal baselines make them do;
`--env` overrides the worker env the runner would give them (`hwloop.partition.cpu_env`).

`--startup` starts workers the way the runner does (all at once, each pinned to its own core when
there are enough) and reports the wall time until every one is ready, and each one's vLLM import
and engine build time, as medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwloop.engine import EngineConfig, engine_config, synthetic_prompt, write_model_dir
from hwloop.partition import available_cores, cpu_env
from hwloop.process import start_workers
from hwloop.runner import Runner, RunnerConfig
from hwloop.worker import Admit, StepCmd, WorkerHandle, WorkerSpec
from policies.batching import make_batching
from policies.placement import LLMPlacement, Placement, Unit, blocks_per_chunk
from policies.specs import ModelSpec
from traces.schema import Workload

SPEC = ModelSpec("bench-llama", 4, 256, 4, 4, 688, 1024, max_context=1024)


def requests(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"request_id": np.arange(n), "model": "llm0", "arrival_s": 0.0,
                         "prompt_tokens": rng.integers(64, 256, n), "output_tokens": rng.integers(64, 192, n)})


def bench_runner(df: pd.DataFrame, cores: tuple[int, ...], max_batch: int, work: Path,
                 decode_runs: bool = True) -> dict[str, Any]:
    share = 100 * len(cores) // len(available_cores())  # the runner turns it back into len(cores)
    llm = LLMPlacement("llm0", SPEC.name, 1, share, share, max_batch, rate=1.0)
    pool = max_batch * blocks_per_chunk(SPEC) * (SPEC.max_context // 32)  # never the bottleneck
    placement = Placement("bench", (Unit(0, 0, (0,), (llm,), kv_blocks=pool),))
    runner = Runner(Workload(df), placement, make_batching("adbs"), {SPEC.name: SPEC},
                    RunnerConfig(work_dir=work, gpu_cores={0: tuple(available_cores())}, decode_runs=decode_runs))
    result = runner.run()
    rec = result.records
    assert (rec.status == "finished").all(), rec[rec.status != "finished"].reason.unique()
    makespan = float(rec.finish_s.max())
    steps = result.stats["steps"]
    in_steps = result.stats["step_ms"]["mean"] * steps / 1e3
    assert result.stats["anomalies"] == []
    return {"makespan_s": makespan, "tokens_per_s": float(df.output_tokens.sum()) / makespan, "steps": steps,
            "decide_ms": result.stats["decide_ms"], "decide_cpu_ms": result.stats["decide_cpu_ms"],
            "overhead_per_step_ms": 1e3 * (makespan - in_steps) / steps, "busy": in_steps / makespan,
            "runner_cpu_per_step_ms": 1e3 * result.stats["runner_cpu_s"] / steps,
            "cores": result.stats["workers"]["llm0"]["cores"], "engine": runner.workers[0].spec.engine}


def bench_bare(df: pd.DataFrame, cfg: EngineConfig, cores: tuple[int, ...]) -> dict[str, Any]:
    """The same requests through a bare engine in a fresh pinned interpreter (see `_bare_main`)."""
    job = {"cfg": cfg.to_dict(), "cores": list(cores),
           "requests": df[["request_id", "prompt_tokens", "output_tokens"]].to_numpy().tolist()}
    env = {**os.environ, **cpu_env(cores)}
    out = subprocess.run([sys.executable, "-m", "hwloop.bench", "--bare"], input=json.dumps(job), env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bare engine failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bare_main() -> None:
    job = json.loads(sys.stdin.read())
    os.sched_setaffinity(0, job["cores"])
    from hwloop.engine import VLLMEngine
    from hwloop.worker import rendezvous_file, warm_up

    engine = VLLMEngine(EngineConfig(**job["cfg"]))
    warm_up(engine)
    t0 = time.perf_counter()
    tokens = 0
    step_s = []
    for rid, prompt, output in job["requests"]:
        engine.add(str(rid), synthetic_prompt(int(rid), int(prompt), engine.config.vocab_size), int(output))
    while engine.has_work():
        t = time.perf_counter()
        tokens += sum(len(o.new_tokens) for o in engine.step())
        step_s.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"makespan_s": elapsed, "tokens_per_s": tokens / elapsed, "steps": len(step_s),
                      "busy": float(np.sum(step_s)) / elapsed,
                      "step_ms_mean": 1e3 * float(np.mean(step_s)), "step_ms_p50": 1e3 * float(np.median(step_s))}),
          flush=True)
    if (path := rendezvous_file()) is not None:
        path.unlink(missing_ok=True)
    os._exit(0)


def summarise(cores: int, df: pd.DataFrame, pairs: list[tuple[dict[str, Any], dict[str, Any]]],
              variant: str = "decode runs") -> dict[str, Any]:
    """Medians over the (runner, bare) rounds of one core count."""

    def med(f: Callable[[dict[str, Any], dict[str, Any]], float]) -> float:
        return float(np.median([f(hw, bare) for hw, bare in pairs]))

    return {
        "cores": cores, "runner": variant, "requests": len(df), "output_tokens": int(df.output_tokens.sum()), "rounds": len(pairs),
        "bare_tok_s": med(lambda h, b: b["tokens_per_s"]), "runner_tok_s": med(lambda h, b: h["tokens_per_s"]),
        "ratio": med(lambda h, b: h["tokens_per_s"] / b["tokens_per_s"]),
        "bare_busy": med(lambda h, b: b["busy"]), "runner_busy": med(lambda h, b: h["busy"]),
        "steps": med(lambda h, b: h["steps"]),
        "decide_ms": med(lambda h, b: h["decide_ms"]["mean"]),
        "decide_ms_p99": med(lambda h, b: h["decide_ms"]["p99"]),
        "decide_cpu_ms": med(lambda h, b: h["decide_cpu_ms"]["mean"]),
        "overhead_per_step_ms": med(lambda h, b: h["overhead_per_step_ms"]),
    }


def bench_startup(workers: int, work: Path) -> dict[str, Any]:
    """Start `workers` engines at once, as the runner does, until all are ready; then stop them."""
    cores = available_cores()
    handles = []
    for i in range(workers):
        mine = (cores[i % len(cores)],)
        cfg = engine_config(SPEC, write_model_dir(SPEC, work / "models"), max_batch=16,
                            pool_blocks=16 * blocks_per_chunk(SPEC) * (SPEC.max_context // 32),
                            chunk_blocks=blocks_per_chunk(SPEC), prefill_tokens=2048)
        handles.append(WorkerHandle(WorkerSpec(f"w{i}", cfg, mine, cpu_env(mine)), work / "logs" / f"w{i}.log"))
    t = time.monotonic()
    try:
        readies = start_workers(handles, timeout_s=600)
        wall = time.monotonic() - t
    finally:
        for h in handles:
            h.stop()
    return {"wall_s": wall, "import_s": max(r.import_s for r in readies), "build_s": max(r.build_s for r in readies)}


def bench_alternate(work: Path, env: dict[str, str], steps: int = 150) -> pd.DataFrame:
    """Decode steps (batch 4) of one engine alone, then of two engines on the same cores in turns."""
    cores = available_cores()
    cfg = engine_config(SPEC, write_model_dir(SPEC, work / "models"), max_batch=16, pool_blocks=10**6,
                        chunk_blocks=blocks_per_chunk(SPEC), prefill_tokens=2048)
    handles = [WorkerHandle(WorkerSpec(f"w{i}", cfg, cores, {**cpu_env(cores), **env}), work / "logs" / f"w{i}.log")
               for i in range(2)]
    try:
        start_workers(handles, timeout_s=600)
        for i, h in enumerate(handles):
            h.send(StepCmd(tuple(Admit(10 * i + k, 64, 64, 10 * steps) for k in range(4))))
            h.recv(60)
        rows = []
        for name, turns in (("alone", handles[:1]), ("in turns", handles)):
            ms = []
            for k in range(steps):
                h = turns[k % len(turns)]
                h.send(StepCmd(()))
                done = h.recv(60)
                ms.append(1e3 * (done.t_end - done.t_start))
            rows.append({"engines": name, "cores": len(cores), "env": " ".join(f"{k}={v}" for k, v in env.items()),
                         "steps": steps, "p50_ms": float(np.median(ms)), "mean_ms": float(np.mean(ms)),
                         "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(np.max(ms))})
        return pd.DataFrame(rows)
    finally:
        for h in handles:
            h.stop()


def startup_table(counts: list[int], rounds: int, work: Path) -> pd.DataFrame:
    rows = []
    for n in counts:
        runs = [bench_startup(n, work) for _ in range(rounds)]
        rows.append({"workers": n, "rounds": rounds, **{k: float(np.median([r[k] for r in runs])) for k in runs[0]}})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cores", type=int, nargs="*", default=[1, 2], help="engine core counts to measure")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="runner/bare pairs per core count")
    ap.add_argument("--step-by-step", action="store_true",
                    help="also replay with decode_runs=False: a decision and a round trip for every step")
    ap.add_argument("--startup", type=int, nargs="+", metavar="WORKERS",
                    help="only measure worker start-up, for each of these numbers of workers started at once")
    ap.add_argument("--alternate", action="store_true",
                    help="only time two engines on the same cores taking turns, against one alone")
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="with --alternate: env to add to the workers' (e.g. GOMP_SPINCOUNT=300000)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare:
        _bare_main()
    if args.alternate:
        with tempfile.TemporaryDirectory(prefix="muxsim-bench-") as tmp:
            report(bench_alternate(Path(tmp), dict(kv.split("=", 1) for kv in args.env)), args.json)
        return
    if args.startup:
        with tempfile.TemporaryDirectory(prefix="muxsim-bench-") as tmp:
            table = startup_table(args.startup, args.rounds, Path(tmp))
        report(table, args.json)
        return
    df = requests(args.requests)
    rows = []
    with tempfile.TemporaryDirectory(prefix="muxsim-bench-") as tmp:
        write_model_dir(SPEC, Path(tmp) / "models")
        for k in args.cores:
            cores = tuple(available_cores()[:k])
            pairs: dict[bool, list[tuple[dict[str, Any], dict[str, Any]]]] = {True: [], False: []}
            for _ in range(args.rounds):
                runs = {True: bench_runner(df, cores, args.max_batch, Path(tmp))}
                if args.step_by_step:
                    runs[False] = bench_runner(df, cores, args.max_batch, Path(tmp), decode_runs=False)
                bare = bench_bare(df, runs[True]["engine"], cores)
                for decode_runs, hw in runs.items():
                    assert tuple(hw["cores"]) == cores
                    pairs[decode_runs].append((hw, bare))
            rows += [summarise(k, df, p, "decode runs" if decode_runs else "step by step")
                     for decode_runs, p in pairs.items() if p]
    report(pd.DataFrame(rows), args.json)


def report(table: pd.DataFrame, json_path: Path | None) -> None:
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"load average after the run: {os.getloadavg()}")
    if json_path:
        json_path.write_text(json.dumps({"rows": table.to_dict(orient="records"), "loadavg": os.getloadavg()},
                                        indent=2))


if __name__ == "__main__":
    main()
