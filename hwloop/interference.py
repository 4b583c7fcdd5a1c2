"""Interference: how much a prefill process and a decode process slow each other down on one device.

MuxServe runs an LLM's prefill and decode jobs side by side under SM shares and assumes they do not
interfere while the shares fit in 100%. This measures it. For each pair of shares (prefill %,
decode %), two torch-engine worker processes start at those shares (MPS client percentages on a
GPU, green contexts, or core sets on a CPU), and for each pair of cells:
1. **alone**: the prefill worker times its cell while the decode worker idles, then the other way
   round, so each job's reference is measured in the same process at the same share;
2. **together**: both time their cells at once, each for about `window_s` (the number of steps is
   set from its alone time). Both start within microseconds (two socket sends), so a step that
   ended before the other worker's last step ended ran concurrently; later steps ran alone and are
   dropped (`concurrent_part`).
slowdown = median together ÷ median alone. `policies.cost.InterferenceModel.fit` reads the table.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hwloop.engine import write_model_dir
from hwloop.partition import Device, MPSDaemon, assign_cores, available_cores, cpu_env
from hwloop.process import start_workers
from hwloop.profiler import Grid, Partition, gpu_env, profile_engine_config
from hwloop.worker import ProfileCmd, ProfileDone, WorkerHandle, WorkerSpec
from policies.specs import ModelSpec

INTERFERENCE_COLUMNS = ("model", "phase", "own_pct", "other_pct", "batch", "seq_len", "other_batch",
                        "other_seq_len", "alone_ms", "together_ms", "slowdown", "n_alone", "n_together")


@dataclass(frozen=True)
class CoRun:
    """One measurement: shares and cells of the prefill job and of the decode job."""

    prefill_pct: int
    decode_pct: int
    prefill: tuple[int, int]  # batch, prompt length
    decode: tuple[int, int]  # batch, context length


def concurrent_part(samples: Sequence[float], other_total_s: float) -> tuple[float, ...]:
    """The leading steps that ended while the other worker, started at the same moment, still ran."""
    ends = np.cumsum(samples)
    return tuple(float(s) for s, end in zip(samples, ends, strict=True) if end <= other_total_s)


def measure_interference(spec: ModelSpec, coruns: Sequence[CoRun], *, device: Device = "cpu",
                         partition: Partition = "mps", gpus: Sequence[int] = (0,), mps: MPSDaemon | None = None,
                         cores: Sequence[int] | None = None, backend: str = "torch", window_s: float = 2.0,
                         repeats: int = 5,
                         max_steps: int = 256, work_dir: str | Path | None = None,
                         startup_timeout_s: float = 600.0, cell_timeout_s: float = 600.0,
                         progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Rows of INTERFERENCE_COLUMNS, two per CoRun (the prefill job's and the decode job's).

    Co-runs with the same pair of shares share one pair of workers. `mps`: a running MPS daemon to
    use, stopped by its owner; without one, partition="mps" starts its own. `max_steps` caps a together
    run's steps (the engine's context must hold a decode cell's context plus them). `backend`: "torch"
    (contiguous caches) or "torch-paged" (the split workers' path, `hwloop.profiler.STEP_TIMING`).
    """
    cores = tuple(cores or available_cores())
    grid = Grid(batches=tuple({b for c in coruns for b in (c.prefill[0], c.decode[0])}),
                seq_lens=tuple({s for c in coruns for s in (c.prefill[1], c.decode[1])}),
                sm_pcts=(100,), warmup=0, repeats=max_steps)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="muxsim-interference-") as tmp:
        work = Path(work_dir or tmp)
        cfg = profile_engine_config(spec, write_model_dir(spec, work / "models"), grid)
        own_mps = MPSDaemon(work / "mps") if device == "cuda" and partition == "mps" and mps is None else None
        mps = mps or own_mps
        try:
            if own_mps:
                own_mps.start()
            by_shares: dict[tuple[int, int], list[CoRun]] = {}
            for c in coruns:
                by_shares.setdefault((c.prefill_pct, c.decode_pct), []).append(c)
            for (p_pct, d_pct), runs in by_shares.items():
                if device == "cpu":
                    envs = [(c, cpu_env(c)) for c in assign_cores([p_pct, d_pct], cores)]
                else:
                    envs = [((), gpu_env(pct, gpus, partition, mps)) for pct in (p_pct, d_pct)]
                specs = [WorkerSpec(f"{phase}-{pct}pct", cfg, c, env, backend, device)
                         for phase, pct, (c, env) in zip(("prefill", "decode"), (p_pct, d_pct), envs, strict=True)]
                workers = [WorkerHandle(s, work / "logs" / f"{s.name}.log") for s in specs]
                try:
                    start_workers(workers, startup_timeout_s)
                    for run in runs:
                        pair = _corun(spec.name, run, workers, window_s, repeats, max_steps, cell_timeout_s)
                        rows += pair
                        if progress:
                            progress(" | ".join(f"{r['phase']} {r['own_pct']}% b={r['batch']} s={r['seq_len']}: "
                                                f"{r['alone_ms']:.2f} → {r['together_ms']:.2f} ms" for r in pair))
                finally:
                    for w in workers:
                        w.stop()
        finally:
            if own_mps:
                own_mps.stop()
    return pd.DataFrame(rows, columns=list(INTERFERENCE_COLUMNS))


def _corun(model: str, run: CoRun, workers: Sequence[WorkerHandle], window_s: float, repeats: int,
           max_steps: int, timeout_s: float) -> list[dict[str, object]]:
    cells = [("prefill", *run.prefill), ("decode", *run.decode)]
    alone = []
    for worker, (phase, batch, length) in zip(workers, cells, strict=True):
        worker.send(ProfileCmd(phase, batch, length, warmup=2, repeats=repeats))  # type: ignore[arg-type]
        alone.append(_samples(worker, timeout_s))
    steps = [min(max_steps, max(3, math.ceil(window_s / float(np.median(a))))) for a in alone]
    for worker, (phase, batch, length), n in zip(workers, cells, steps, strict=True):
        worker.send(ProfileCmd(phase, batch, length, warmup=0, repeats=n))  # type: ignore[arg-type]
    together = [_samples(w, timeout_s) for w in workers]
    totals = [sum(t) for t in together]
    rows = []
    for i, (phase, batch, length) in enumerate(cells):
        own, other = (run.prefill_pct, run.decode_pct) if i == 0 else (run.decode_pct, run.prefill_pct)
        _, other_batch, other_len = cells[1 - i]
        kept = concurrent_part(together[i], totals[1 - i])
        alone_ms = 1e3 * float(np.median(alone[i]))
        together_ms = 1e3 * float(np.median(kept)) if kept else math.nan
        rows.append(dict(zip(INTERFERENCE_COLUMNS, (
            model, phase, own, other, batch, length, other_batch, other_len, alone_ms, together_ms,
            together_ms / alone_ms, len(alone[i]), len(kept)), strict=True)))
    return rows


def _samples(worker: WorkerHandle, timeout_s: float) -> tuple[float, ...]:
    done: ProfileDone = worker.recv(timeout_s, what="a profile cell")
    return done.samples_s
