"""GPU calibration in one call: probe how SMs can be partitioned, profile Llama-7B/13B shapes with
the torch engine (no vLLM) over SM shares, measure prefill/decode interference. Everything lands in
`--out` as files, each rewritten as soon as a part ends, so a run cut short still returns its results.

    python -m experiments.gpu_calibrate --out "$OUT"                         # on the GPU machine
    python -m experiments.gpu_calibrate --out /tmp/cal --tiny --device cpu   # smoke test on a CPU

Needs torch, numpy, pandas and pyyaml (a dependency of transformers) and this repository: no vLLM,
no Hydra, no network. The parent process never touches CUDA (an MPS daemon must be up before any
CUDA context exists): every GPU measurement runs in a child process.

In order:
1. probe → probe.json: nvidia-smi (GPU, driver, memory, compute mode, MIG), torch and CUDA; MPS:
   start a daemon in a temporary folder this run owns (kept for the whole run), time a bf16 matmul
   in a client at 100% and at 50%; green contexts: does this torch expose them, and is a matmul in
   one holding half the SMs slower? Every failure is recorded as it happened (exit code, stderr).
2. partition: MPS if its 50% client was slower than its 100% one (so the percentage is enforced);
   else green contexts if they were; else none, and only 100% is measured.
3. jobs, in priority order: each model at 100%; the interference co-runs; then the other shares
   (50, 30, 70, 40, 60, 80, 90), every model per share. profile.csv (+ .meta.json: device, driver,
   torch/CUDA versions, partition, grid, each job) and interference.csv (+ .meta.json with the
   fitted `policies.cost.InterferenceModel`) are rewritten after each job.
4. `--budget-s`: a job starts only if its expected time (the last like job's, scaled by model
   size and 1/share) fits in the budget left. summary.json lists what ran, what was skipped and why,
   and what failed; calibrate.log has every step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from hwloop.interference import CoRun, measure_interference
from hwloop.partition import MPSDaemon, PartitionError, mps_env
from hwloop.process import WorkerError
from hwloop.profiler import Grid, ProfileError, ProfileResult, profile, write_profile
from policies.cost import InterferenceModel
from policies.specs import GiB, ModelSpec, model_spec

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("muxsim.gpu_calibrate")

SHARE_ORDER = (100, 50, 30, 70, 40, 60, 80, 90)  # 100% first, then spread, so a cut-short run covers the range
GPU_MODELS = ("llama-7b", "llama-13b")
# (prefill %, decode %): fitting in 100% at three splits, then overloaded by 20% and 40%.
GPU_SHARE_PAIRS = ((70, 30), (50, 50), (40, 60), (80, 40), (60, 60), (90, 50))
GPU_CELL_PAIRS = (((1, 1024), (16, 512)), ((8, 512), (64, 512)))  # (prefill batch, len), (decode batch, ctx)
RESERVE_BYTES = 6 * GiB  # CUDA context, activations of a 16k-token prefill, allocator slack
MIN_SLOWDOWN = 1.3  # a 50% partition must slow a matmul at least this much to count as enforced


@dataclass(frozen=True)
class Plan:
    device: str
    models: tuple[ModelSpec, ...]
    grids: dict[str, Grid]  # per model (its KV cap depends on its size); sm_pcts set per job
    shares: tuple[int, ...]
    interference_model: ModelSpec
    coruns: tuple[CoRun, ...]
    window_s: float
    max_steps: int


def with_context(spec: ModelSpec, tokens: int) -> ModelSpec:
    """The same shape with room for `tokens` (the presets stop at 2048; a decode cell at 2048 needs
    a few more). Only the rotary table grows."""
    return replace(spec, max_context=max(spec.max_context, tokens))


def gpu_grid(spec: ModelSpec, memory_bytes: int) -> Grid:
    """Batch 1..256 × length 32..2048, 4× apart (latency is close to bilinear in batch and length
    there, which is how the cost model interpolates), with the cells that do not fit dropped: prefill
    above 16k tokens (seconds per step, and linear beyond, so the cost model extrapolates it) and KV
    caches beyond 90% of the GPU's memory after the weights."""
    kv_budget = 0.9 * memory_bytes - spec.weight_bytes - RESERVE_BYTES
    return Grid(batches=(1, 4, 16, 64, 256), seq_lens=(32, 64, 128, 512, 2048), sm_pcts=(100,), warmup=1,
                repeats=3, max_prefill_tokens=16384, max_kv_tokens=max(0, int(kv_budget // spec.kv_bytes_per_token)))


def gpu_plan(models: Sequence[str], memory_bytes: int) -> Plan:
    specs = tuple(with_context(model_spec(m), 4096) for m in models)
    coruns = tuple(CoRun(p, d, pc, dc) for p, d in GPU_SHARE_PAIRS for pc, dc in GPU_CELL_PAIRS)
    return Plan("cuda", specs, {s.name: gpu_grid(s, memory_bytes) for s in specs}, SHARE_ORDER,
                with_context(model_spec("llama-7b"), 4096), coruns, window_s=2.0, max_steps=256)


def tiny_plan(device: str) -> Plan:
    """Seconds on a CPU: the same code paths as the GPU plan, on a 2-layer model."""
    spec = ModelSpec("tiny-llama", 2, 64, 4, 4, 172, 512, max_context=256)
    grid = Grid(batches=(1, 2), seq_lens=(16, 32), sm_pcts=(100,), warmup=1, repeats=2)
    return Plan(device, (spec,), {spec.name: grid}, (100, 50), spec,
                (CoRun(50, 50, (1, 32), (2, 32)),), window_s=0.2, max_steps=16)


# ---- probes (each GPU probe runs in a child process) ---------------------------------------------


def run_child(args: Sequence[str], env: dict[str, str] | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Run a command: its exit code, its output (stdout's head, stderr's tail, where a traceback
    ends) and, when it printed one, its last JSON line."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
    except FileNotFoundError as e:
        return {"ok": False, "cmd": shlex.join(args), "error": str(e)}
    except subprocess.TimeoutExpired:
        return {"ok": False, "cmd": shlex.join(args), "error": f"timed out after {timeout_s:g} s"}
    out: dict[str, Any] = {"ok": done.returncode == 0, "cmd": shlex.join(args), "rc": done.returncode,
                           "stdout": done.stdout[:8000], "stderr": done.stderr[-3000:]}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode == 0 and lines:
        out["result"] = json.loads(lines[-1])
    return out


def child(function: str, env: dict[str, str] | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Call one of this module's `probe_*` functions in a fresh interpreter."""
    return run_child([sys.executable, "-c", f"import experiments.gpu_calibrate as c; c.{function}()"], env, timeout_s)


def nvidia_smi() -> dict[str, Any]:
    """The GPUs as nvidia-smi reports them, plus its plain report (driver and CUDA versions, MIG)."""
    fields = "name,driver_version,memory.total,compute_mode"
    got = run_child(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if got["ok"]:
        got["gpus"] = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))
                       for line in got["stdout"].strip().splitlines()]
    got["report"] = run_child(["nvidia-smi"]).get("stdout", "")
    return got


def _matmul_seconds(n: int = 8192, reps: int = 20) -> float:
    """Mean time of a bf16 n×n matmul on the current stream (of a green context, if one is current)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.current_stream().synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    torch.cuda.current_stream().synchronize()
    return (time.perf_counter() - t0) / reps


def probe_torch() -> None:
    import torch
    from torch.cuda import green_contexts

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
                            "green_contexts_supported": bool(getattr(green_contexts, "SUPPORTED", False))}
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info |= {"device_name": p.name, "total_memory": p.total_memory, "sm_count": p.multi_processor_count,
                 "capability": f"{p.major}.{p.minor}"}
    print(json.dumps(info))


def probe_matmul() -> None:
    import torch

    print(json.dumps({"seconds": _matmul_seconds(), "device_name": torch.cuda.get_device_name()}))


def probe_green() -> None:
    """Matmul time on the whole GPU, then inside a green context with half the SMs."""
    import torch

    from hwloop.torch_engine import enter_green_context

    full = _matmul_seconds()
    ctx, stream, n = enter_green_context(50)
    with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
        half = _matmul_seconds()
    print(json.dumps({"full_s": full, "green_s": half, "green_sms": n, "api": "stream" if stream else "set_context",
                      "slowdown": half / full, "context": type(ctx).__name__}))


def probe_mps(daemon: MPSDaemon, gpus: Sequence[int]) -> dict[str, Any]:
    """Start the run's daemon and time a matmul in a client at 100% and at 50%. The daemon is left
    running when its clients ran (the run uses it), stopped otherwise."""
    out: dict[str, Any] = {"control": shutil.which(daemon.control), "pipe_dir": str(daemon.pipe_dir)}
    try:
        daemon.start()
    except (PartitionError, OSError, subprocess.SubprocessError) as e:
        return out | {"ok": False, "stage": "daemon start", "error": str(e)}
    clients = {pct: child("probe_matmul", mps_env(pct, gpus, daemon.pipe_dir, daemon.log_dir)) for pct in (100, 50)}
    out["clients"] = clients
    out["logs"] = {p.name: p.read_text(errors="replace")[-2000:] for p in sorted(daemon.log_dir.glob("*.log"))}
    if not all("result" in c for c in clients.values()):
        daemon.stop()
        return out | {"ok": False, "stage": "client"}
    slowdown = clients[50]["result"]["seconds"] / clients[100]["result"]["seconds"]
    return out | {"ok": True, "slowdown_at_50pct": slowdown, "partitions": slowdown >= MIN_SLOWDOWN}


def run_probes(device: str, daemon: MPSDaemon | None, gpus: Sequence[int]) -> dict[str, Any]:
    if device != "cuda":
        return {"device": device, "note": "no GPU probes on a CPU run"}
    probe: dict[str, Any] = {"nvidia_smi": nvidia_smi(), "torch": child("probe_torch")}
    green_ok = probe["torch"].get("result", {}).get("green_contexts_supported", False)
    # Green contexts first: once the MPS daemon is up, every CUDA process should be its client.
    probe["green"] = child("probe_green") if green_ok else {"ok": False, "error": "torch.cuda.green_contexts.SUPPORTED is false"}
    assert daemon is not None
    probe["mps"] = probe_mps(daemon, gpus)
    return probe


def choose_partition(probe: dict[str, Any], forced: str) -> tuple[str, str]:
    """The partition to profile with, and why."""
    if forced != "auto":
        return forced, "forced by --partition"
    mps, green = probe.get("mps", {}), probe.get("green", {})
    if mps.get("partitions"):
        return "mps", f"MPS clients ran; 50% was {mps['slowdown_at_50pct']:.2f}× slower than 100%"
    why = f"MPS: {mps.get('stage', 'ran')} {mps.get('error', '')}".strip()
    if mps.get("ok"):
        why = f"MPS clients ran but 50% was only {mps['slowdown_at_50pct']:.2f}× slower (not enforced)"
    result = green.get("result", {})
    if result.get("slowdown", 0) >= MIN_SLOWDOWN:
        return "green", f"{why}; green context with half the SMs {result['slowdown']:.2f}× slower"
    return "none", f"{why}; green contexts: {result or green.get('error') or green.get('stderr', '')[-300:]}"


# ---- jobs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    kind: str  # "profile" | "interference"
    model: ModelSpec
    share: int = 100


def job_order(plan: Plan, shares: Sequence[int], interference: bool, profiles: bool) -> list[Job]:
    first = [Job("profile", m, shares[0]) for m in plan.models] if profiles else []
    rest = [Job("profile", m, s) for s in shares[1:] for m in plan.models] if profiles else []
    return first + ([Job("interference", plan.interference_model)] if interference else []) + rest


def expected_s(job: Job, history: Sequence[tuple[Job, float]]) -> float:
    """From the last finished job of the same kind, scaled by parameters and, for a profile, 1/share
    (prefill, most of a profile's time, is compute-bound). 0 when there is nothing to scale from."""
    like = [(j, s) for j, s in history if j.kind == job.kind]
    if not like:
        return 0.0
    ref, seconds = like[-1]
    scale = job.model.params / ref.model.params
    return seconds * scale * (ref.share / job.share if job.kind == "profile" else 1.0)


class Outputs:
    """The files of a run, rewritten after every job."""

    def __init__(self, out: Path, context: dict[str, Any]) -> None:
        self.out = out
        self.context = context  # probe highlights, partition, command: goes into every meta
        self.tables: list[pd.DataFrame] = []
        self.profile_meta: dict[str, Any] = {}
        self.jobs: list[dict[str, Any]] = []

    def add_profile(self, result: ProfileResult, job: Job, seconds: float) -> None:
        self.tables.append(result.table)
        if not self.profile_meta:
            self.profile_meta = {k: v for k, v in result.meta.items() if k not in ("share_groups", "model_spec", "grid")}
            self.profile_meta |= {"models": {}, "grids": {}, "share_groups": {}}
        self.profile_meta["models"][job.model.name] = dataclasses.asdict(job.model)
        self.profile_meta["grids"][job.model.name] = result.meta["grid"]
        self.profile_meta["share_groups"][f"{job.model.name}@{job.share}"] = result.meta["share_groups"]
        self.jobs.append({"model": job.model.name, "share": job.share, "seconds": round(seconds, 1),
                          "versions": result.meta["versions"], "load_average": result.meta["load_average"]})
        meta = self.profile_meta | {"calibration": self.context, "jobs": self.jobs}
        write_profile(ProfileResult(pd.concat(self.tables, ignore_index=True), meta), self.out / "profile.csv")

    def add_interference(self, table: pd.DataFrame, plan: Plan, partition: str) -> InterferenceModel:
        table.to_csv(self.out / "interference.csv", index=False)
        fit = InterferenceModel.fit(table, label=f"fitted: interference.csv ({partition})")
        meta = {"kind": "measured", "engine": "torch", "partition": partition,
                "model_spec": dataclasses.asdict(plan.interference_model), "window_s": plan.window_s,
                "coruns": [dataclasses.asdict(c) for c in plan.coruns], "method": "hwloop.interference",
                "fit": {"formula": "1 + a*others/100 + b*max(0, (own + others)/100 - 1), per phase",
                        "coef": dict(fit.coef), "rmse": dict(fit.rmse)},
                "calibration": self.context}
        (self.out / "interference.meta.json").write_text(json.dumps(meta, indent=2, default=str))
        return fit


def run_job(job: Job, plan: Plan, partition: str, gpus: Sequence[int], daemon: MPSDaemon | None,
            outputs: Outputs) -> None:
    mps = daemon if partition == "mps" else None
    part = "none" if plan.device == "cpu" else partition
    if job.kind == "profile":
        grid = replace(plan.grids[job.model.name], sm_pcts=(job.share,))
        t0 = time.monotonic()
        result = profile(job.model, grid, device=plan.device, backend="torch", partition=part,  # type: ignore[arg-type]
                         gpus=gpus, mps=mps, progress=log.info)
        outputs.add_profile(result, job, time.monotonic() - t0)
    else:
        coruns = plan.coruns if partition != "none" else tuple(dict.fromkeys(
            replace(c, prefill_pct=100, decode_pct=100) for c in plan.coruns))
        table = measure_interference(job.model, coruns, device=plan.device, partition=part,  # type: ignore[arg-type]
                                     gpus=gpus, mps=mps, window_s=plan.window_s, max_steps=plan.max_steps,
                                     progress=log.info)
        fit = outputs.add_interference(table, replace(plan, coruns=coruns), partition)
        log.info("interference fit: %s (rmse %s)", dict(fit.coef), dict(fit.rmse))


def memory_bytes(probe: dict[str, Any]) -> int:
    """The GPU's memory, from torch in a child (nvidia-smi's MiB as a fallback)."""
    total = probe.get("torch", {}).get("result", {}).get("total_memory")
    if total:
        return int(total)
    gpus = probe.get("nvidia_smi", {}).get("gpus") or [{}]
    try:
        return int(float(gpus[0].get("memory.total", "")) * 2**20)
    except ValueError:
        raise SystemExit("no GPU memory size from torch or nvidia-smi: see probe.json") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder ($OUT on the device)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on a tiny grid: the smoke test")
    ap.add_argument("--models", default=",".join(GPU_MODELS), help="presets to profile (GPU plan)")
    ap.add_argument("--shares", help=f"SM shares in the order to run (default {','.join(map(str, SHARE_ORDER))})")
    ap.add_argument("--parts", default="profile,interference", help="profile and/or interference")
    ap.add_argument("--partition", choices=("auto", "mps", "green", "none"), default="auto")
    ap.add_argument("--gpus", default="0")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for the whole run")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        ap.error("--device cpu runs the --tiny smoke plan only")
    return args


def run_jobs(jobs: Sequence[Job], plan: Plan, partition: str, gpus: Sequence[int], daemon: MPSDaemon | None,
             outputs: Outputs, deadline: float, summary: dict[str, Any]) -> None:
    """Each job in order if its expected time fits before `deadline` (time.monotonic()); a failed job
    is recorded and the next one runs."""
    history: list[tuple[Job, float]] = []
    for job in jobs:
        name = f"{job.kind} {job.model.name}" + (f" @ {job.share}%" if job.kind == "profile" else "")
        left, need = deadline - time.monotonic(), 1.2 * expected_s(job, history)
        if need > left:
            log.info("skip %s: expected %.0f s, %.0f s left", name, need, left)
            summary["skipped"].append({"job": name, "expected_s": round(need), "left_s": round(left)})
            continue
        log.info("start %s (expected %.0f s, %.0f s left)", name, need, left)
        t0 = time.monotonic()
        try:
            run_job(job, plan, partition, gpus, daemon, outputs)
        except (WorkerError, ProfileError, PartitionError, OSError) as e:
            log.exception("%s failed", name)
            summary["failed"].append({"job": name, "error": str(e)[-3000:]})
            continue
        history.append((job, time.monotonic() - t0))
        summary["done"].append({"job": name, "seconds": round(history[-1][1], 1)})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True,
                        handlers=[logging.FileHandler(out / "calibrate.log"), logging.StreamHandler()])
    # Workers and probes are fresh interpreters: they import this repository wherever the run started.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # A SIGTERM (a time limit) still stops the MPS daemon and writes summary.json.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    gpus = tuple(int(g) for g in args.gpus.split(","))
    summary: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "budget_s": args.budget_s,
                               "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                               "done": [], "skipped": [], "failed": []}
    daemon = MPSDaemon() if args.device == "cuda" else None
    try:
        probe = run_probes(args.device, daemon, gpus)
        (out / "probe.json").write_text(json.dumps(probe, indent=2, default=str))
        plan = tiny_plan(args.device) if args.tiny else gpu_plan(args.models.split(","), memory_bytes(probe))
        partition, why = choose_partition(probe, args.partition) if args.device == "cuda" else ("cores", "CPU run")
        log.info("partition: %s (%s)", partition, why)
        if daemon is not None and partition != "mps":
            daemon.stop()  # no MPS server may outlive its use: the workers will not be its clients
        shares = [int(s) for s in args.shares.split(",")] if args.shares else list(plan.shares)
        context = {"partition": partition, "why": why, "nvidia_smi": probe.get("nvidia_smi", {}).get("gpus"),
                   "torch": probe.get("torch", {}).get("result"), "command": summary["command"],
                   "models": "preset shapes, random weights; max_context raised only to fit the grid"}
        summary |= {"partition": partition, "why": why}
        parts = set(args.parts.split(","))
        jobs = job_order(plan, [100] if partition == "none" else shares, "interference" in parts, "profile" in parts)
        run_jobs(jobs, plan, partition, gpus, daemon, Outputs(out, context), start + args.budget_s, summary)
    finally:
        if daemon is not None:
            daemon.stop()
        summary["wall_s"] = round(time.monotonic() - start, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("done in %.0f s: %d jobs, %d skipped, %d failed; files in %s", summary["wall_s"],
                 len(summary["done"]), len(summary["skipped"]), len(summary["failed"]), out)
    return 1 if summary["failed"] and not summary["done"] else 0


if __name__ == "__main__":
    sys.exit(main())
