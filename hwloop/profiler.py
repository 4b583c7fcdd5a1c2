"""Step-latency profiler: measures prefill and decode steps over a grid and writes the profile table
the simulator's cost model reads (`policies.cost.TableCostModel.from_profile`).

Table format (long form, one row per cell): `model, tp, sm_pct, batch, seq_len, phase,
latency_ms, std_ms, repeats` plus `min_ms, max_ms` (`latency_ms`: the median of the timed repeats); `.parquet` with its metadata as JSON under the
schema key `muxsim.meta`, or `.csv` with a `.meta.json` sidecar. The metadata records the device
and host, torch and vLLM versions, the date, the exact command and how the grid was measured.

- prefill(batch, seq_len): one engine step over `batch` new sequences of about `seq_len` tokens
  (each timed repeat at an odd offset from it, `prefill_lengths`: served prompts are rarely aligned).
- decode(batch, seq_len): one engine step for `batch` sequences whose KV cache holds `seq_len`
  tokens. The timed steps are consecutive steps of one batch, so their contexts run from
  `seq_len - repeats // 2` upwards, centred on `seq_len`.

Shares: each SM share runs in its own engine process with the share the runner would give it
(`hwloop.partition`): on CPU a core set (50% of 2 cores = 1 core), on NVIDIA an MPS percentage.
Shares that map to the same core count are measured once and written once per share, so the table
steps exactly where the hardware does. Workers run one at a time: a measurement never shares its
cores with another engine.

Engines plug in through `StepEngine`; `profile(backend=...)` picks one: `VLLMStepEngine` (vLLM),
or `hwloop.torch_engine.TorchStepEngine` (a Llama in plain PyTorch, for GPUs without vLLM). On a
GPU a share is an MPS client percentage (`partition="mps"`), or for the torch engine a CUDA green
context (`"green"`); `"none"` runs the whole GPU and measures 100% only.

Cells a grid caps (`max_prefill_tokens`, `max_kv_tokens`, e.g. what fits in GPU memory) are not
measured and not written: the cost model sees NaN there, as it does for MuxServe's −1 cells.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from hwloop.engine import EngineConfig, VLLMEngine, synthetic_prompt, write_model_dir
from hwloop.partition import Device, MPSDaemon, available_cores, cores_for_share, cpu_env, mps_env
from hwloop.process import start_workers
from hwloop.speed import SpeedMonitor
from hwloop.worker import ProfileCmd, ProfileDone, WorkerHandle, WorkerSpec
from policies.placement import BLOCK_TOKENS
from policies.specs import ModelSpec

Partition = Literal["mps", "green", "none"]
STEP_TIMING = {
    "vllm": "perf_counter around one LLMEngine.step(); decode cells start with a real prefill",
    "torch": "perf_counter around one forward + argmax + copy of the tokens to the host, the device "
             "synchronised before it; eager PyTorch, no CUDA graphs; decode cells start from a synthetic "
             "(random) KV context of seq_len tokens",
    "torch-paged": "as torch, through the split workers' paged path: KV in pool blocks read and written "
                   "through block tables (gathered for attention), decode contexts synthetic (random)",
}
PROFILE_COLUMNS = ("model", "tp", "sm_pct", "batch", "seq_len", "phase", "latency_ms", "std_ms", "repeats",
                   "min_ms", "max_ms")


class ProfileError(RuntimeError):
    """A cell the engine could not measure as asked (e.g. it split the step); names the cell."""


class StepEngine(Protocol):
    """What the profiler needs from an inference engine: wall time of single steps, in seconds.
    An engine may set `prefill_offsets` (`PREFILL_OFFSETS`): its prefill cells are then timed at
    those offsets from their length."""

    def prefill(self, batch: int, seq_len: int) -> float: ...

    def decode(self, batch: int, ctx_len: int, steps: int) -> list[float]:
        """Times of `steps` consecutive decode steps of one batch whose context starts at `ctx_len`."""
        ...


class VLLMStepEngine:
    """`StepEngine` over an in-process vLLM engine (the runner's own, so timings match the runner's)."""

    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine
        self._n = 0

    def _add(self, batch: int, length: int, max_tokens: int) -> list[str]:
        keys = []
        for _ in range(batch):
            self._n += 1
            key = f"profile-{self._n}"
            self.engine.add(key, synthetic_prompt(self._n, length, self.engine.config.vocab_size), max_tokens)
            keys.append(key)
        return keys

    def _timed_step(self, keys: Sequence[str], what: str) -> float:
        t0 = time.perf_counter()
        outputs = self.engine.step()
        elapsed = time.perf_counter() - t0
        got = {o.key for o in outputs if len(o.new_tokens) == 1}
        if got != set(keys):
            raise ProfileError(f"{what}: {len(got)} of {len(keys)} sequences got a token in one step "
                               f"(the engine split or preempted the batch)")
        return elapsed

    def prefill(self, batch: int, seq_len: int) -> float:
        keys = self._add(batch, seq_len, 1)
        return self._timed_step(keys, f"prefill batch {batch} × {seq_len}")

    def decode(self, batch: int, ctx_len: int, steps: int) -> list[float]:
        keys = self._add(batch, ctx_len, steps + 1)
        self._timed_step(keys, f"decode batch {batch} at {ctx_len} (prefill)")
        return [self._timed_step(keys, f"decode batch {batch} at {ctx_len + i}") for i in range(steps)]


# Odd offsets from a prefill cell's length, one per timed repeat (cycled), centred on it, for the
# torch engines (`StepEngine.prefill_offsets`). Served prompts have any length, and a prompt of a
# multiple of 16 or 32 tokens fills the CPU kernels' row blocks exactly: measured on the split
# prefill worker (tiny-l4-h512, one core, back to back, medians), 128 tokens took 12.5 ms, 129
# 13.5 ms, 150 14.4 ms, 200 17.7 ms against 16.1 ms interpolated between 128 and 256; served prompts
# replayed back to back came to 1.18-1.20x the profile of aligned lengths (`python -m
# experiments.job_replay`). vLLM's cells keep their own lengths: a vLLM step that prefills runs
# padded to 32 tokens (`hwloop.engine.STEP_TOKEN_MULTIPLE`), the shape served steps run. (With
# these offsets on vLLM's cells, the mixed validation test's saturated throughput once fell to
# -35..-46% against the simulator; the official CI at beb0484 saw the same without them: the cause
# was vLLM building kernels per new token count, which `hwloop.engine` now pads and builds ahead.)
PREFILL_OFFSETS = (1, -1, 3, -3, 5, -5)


def prefill_lengths(seq_len: int, repeats: int, offsets: Sequence[int] = PREFILL_OFFSETS) -> list[int]:
    """The prompt length of each timed repeat of a prefill cell of `seq_len` (at least 1)."""
    return [max(1, seq_len + offsets[i % len(offsets)]) if offsets else seq_len for i in range(repeats)]


def time_cell(engine: StepEngine, cmd: ProfileCmd) -> tuple[float, ...]:
    """Warm-up plus repeats of one cell; returns the timed samples only. A prefill's repeats are at
    the engine's lengths around the cell's (`prefill_lengths`), each offset length run once untimed
    first; a decode's are consecutive steps of one batch."""
    n = cmd.warmup + cmd.repeats
    offsets = getattr(engine, "prefill_offsets", ())
    if cmd.phase == "prefill" and not offsets:
        samples = [engine.prefill(cmd.batch, cmd.seq_len) for _ in range(n)]
    elif cmd.phase == "prefill":
        for _ in range(cmd.warmup):
            engine.prefill(cmd.batch, cmd.seq_len)
        samples = []
        for length in prefill_lengths(cmd.seq_len, cmd.repeats, offsets):
            engine.prefill(cmd.batch, length)  # this length's kernels built: a served trace met it before
            samples.append(engine.prefill(cmd.batch, length))
        return tuple(samples)
    else:
        start = max(1, cmd.seq_len - cmd.repeats // 2 - cmd.warmup)
        samples = engine.decode(cmd.batch, start, n)
    return tuple(samples[cmd.warmup:])


@dataclass(frozen=True)
class Grid:
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seq_lens: tuple[int, ...] = (32, 64, 128, 256, 512)
    sm_pcts: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    phases: tuple[str, ...] = ("prefill", "decode")
    warmup: int = 2
    repeats: int = 5
    max_prefill_tokens: int | None = None  # skip prefill cells of more than this many batch × seq_len tokens
    max_kv_tokens: int | None = None  # skip cells whose KV cache would hold more tokens than this

    def cells(self) -> list[ProfileCmd]:
        return [ProfileCmd(phase, b, s, self.warmup, self.repeats)  # type: ignore[arg-type]
                for phase in self.phases for b in self.batches for s in self.seq_lens if self.fits(phase, b, s)]

    def fits(self, phase: str, batch: int, seq_len: int) -> bool:
        """Within the caps; a decode cell's KV cache also holds the tokens its timed steps add."""
        if phase == "prefill":
            if self.max_prefill_tokens and batch * seq_len > self.max_prefill_tokens:
                return False
            kv_tokens = batch * seq_len
        else:
            kv_tokens = batch * (seq_len + self.warmup + self.repeats + 1)
        return not self.max_kv_tokens or kv_tokens <= self.max_kv_tokens


def profile_engine_config(spec: ModelSpec, model_dir: str | Path, grid: Grid, dummy: bool = True) -> EngineConfig:
    """An engine large enough for every cell in one step: no chunking, no preemption."""
    steps = grid.warmup + grid.repeats + 1
    max_len = min(spec.max_context, max(grid.seq_lens) + steps + 1)
    if max(grid.seq_lens) + steps + 1 > spec.max_context:
        raise ProfileError(f"{spec.name}: seq_len {max(grid.seq_lens)} plus {steps} decode steps exceeds its "
                           f"context {spec.max_context}")
    per_seq = -(-max_len // BLOCK_TOKENS)
    return EngineConfig(
        model_dir=str(model_dir), dummy=dummy, dtype="float32" if spec.dtype_bytes == 4 else "bfloat16",
        max_model_len=max_len, kv_blocks=max(grid.batches) * per_seq, kv_bytes_per_token=spec.kv_bytes_per_token,
        max_num_seqs=max(grid.batches), max_batched_tokens=max(max(grid.batches) * (max(grid.seq_lens) + max(PREFILL_OFFSETS)), max_len),
        vocab_size=spec.vocab_size)


@dataclass
class ProfileResult:
    table: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)


def share_groups(sm_pcts: Sequence[int], device: Device, ncores: int) -> dict[int, list[int]]:
    """Shares that run identically on this device, keyed by what they get (cores on CPU, % on GPU)."""
    groups: dict[int, list[int]] = {}
    for pct in sorted(set(sm_pcts)):
        key = cores_for_share(pct, ncores) if device == "cpu" else pct
        groups.setdefault(key, []).append(pct)
    return groups


def gpu_env(share_pct: int, gpus: Sequence[int], partition: Partition, mps: MPSDaemon | None) -> dict[str, str]:
    """How a GPU worker gets its share: an MPS client percentage, a green context, or the whole GPU."""
    if partition == "mps":
        assert mps is not None
        return mps_env(share_pct, gpus, mps.pipe_dir, mps.log_dir)
    env = {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}
    if partition == "green":
        from hwloop.torch_engine import GREEN_ENV

        env[GREEN_ENV] = str(share_pct)
    return env


def profile(spec: ModelSpec, grid: Grid, *, device: Device = "cpu", backend: str = "vllm",
            partition: Partition = "mps", cores: Sequence[int] | None = None,
            gpus: Sequence[int] = (0,), mps: MPSDaemon | None = None, model_dir: str | Path | None = None, dummy: bool = True,
            work_dir: str | Path | None = None,
            startup_timeout_s: float = 600.0, cell_timeout_s: float = 600.0,
            progress: Callable[[str], None] | None = None) -> ProfileResult:
    """Measure every cell of `grid` for one model, one share group at a time.

    `model_dir`: a folder vLLM loads (a real checkpoint with `dummy=False`); without it a folder
    holding `spec`'s config.json is written and the weights are random (the torch engine: always).
    `backend`: "vllm", "torch" or "torch-paged" (the split workers' path); `partition` (CUDA only): "mps", "green" (torch only) or "none".
    `mps`: a running MPS daemon to use, stopped by its owner; without one, "mps" starts its own.
    """
    with ProfileWorkers(spec, grid, device=device, backend=backend, partition=partition, cores=cores, gpus=gpus,
                        mps=mps, model_dir=model_dir, dummy=dummy, work_dir=work_dir,
                        startup_timeout_s=startup_timeout_s, cell_timeout_s=cell_timeout_s,
                        progress=progress) as workers:
        return workers.measure(keep=False)


class ProfileWorkers:
    """`profile`'s workers for one model and grid, one per share group, each started the first time
    `measure` needs it and kept until `close`: `measure` times the grid again on the same engines as
    often as asked. A validation times a few cells between its hardware runs this way
    (`experiments.validate.Yardstick`) without a worker's start-up each time (a vLLM engine's: about
    10 s on 2 cores); between calls the workers are paused (`WorkerProcess.pause`), so they take no
    CPU from the engines being timed. Arguments as `profile`'s."""

    def __init__(self, spec: ModelSpec, grid: Grid, *, device: Device = "cpu", backend: str = "vllm",
                 partition: Partition = "mps", cores: Sequence[int] | None = None,
                 gpus: Sequence[int] = (0,), mps: MPSDaemon | None = None, model_dir: str | Path | None = None,
                 dummy: bool = True, work_dir: str | Path | None = None,
                 startup_timeout_s: float = 600.0, cell_timeout_s: float = 600.0,
                 progress: Callable[[str], None] | None = None) -> None:
        if backend not in STEP_TIMING:
            raise ProfileError(f"unknown engine {backend!r} ({' | '.join(STEP_TIMING)})")
        if backend.startswith("torch") and not dummy:
            raise ProfileError("the torch engine runs random weights only (dummy=True)")
        if device == "cuda" and partition == "green" and not backend.startswith("torch"):
            raise ProfileError("green-context shares need the torch engine")
        if device == "cuda" and partition == "none" and set(grid.sm_pcts) != {100}:
            raise ProfileError(f"without a partition every worker has the whole GPU: measure sm_pcts=[100], "
                               f"not {list(grid.sm_pcts)}")
        self.spec, self.grid, self.device, self.backend, self.partition = spec, grid, device, backend, partition
        self.cores, self.gpus = tuple(cores or available_cores()), tuple(gpus)
        self.startup_timeout_s, self.cell_timeout_s, self.progress = startup_timeout_s, cell_timeout_s, progress
        self._tmp = tempfile.TemporaryDirectory(prefix="muxsim-profile-") if work_dir is None else None
        self.work = Path(work_dir or self._tmp.name)  # type: ignore[union-attr]
        folder = Path(model_dir) if model_dir else write_model_dir(spec, self.work / "models")
        self.cfg = profile_engine_config(spec, folder, grid, dummy=dummy or model_dir is None)
        self.groups = share_groups(grid.sm_pcts, device, len(self.cores))
        self._own_mps = MPSDaemon(self.work / "mps") if device == "cuda" and partition == "mps" and mps is None else None
        self.mps = mps or self._own_mps
        self._workers: dict[int, WorkerHandle] = {}
        self.versions: dict[str, str] = {}

    def __enter__(self) -> ProfileWorkers:
        if self._own_mps:
            self._own_mps.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (and an MPS daemon of our own)."""
        try:
            for worker in self._workers.values():
                worker.stop()
            self._workers.clear()
        finally:
            if self._own_mps:
                self._own_mps.stop()
            if self._tmp is not None:
                self._tmp.cleanup()

    def _worker(self, key: int) -> WorkerHandle:
        """The worker of a share group (`key`: its cores on CPU, its percentage on a GPU), started now
        if it is not yet."""
        if key not in self._workers:
            if self.device == "cpu":
                mine = self.cores[:key]
                wspec = WorkerSpec(f"profile-{key}cores", self.cfg, mine, cpu_env(mine), self.backend, self.device,
                                   warm_shapes=False)
            else:
                wspec = WorkerSpec(f"profile-{key}pct", self.cfg, (), gpu_env(key, self.gpus, self.partition, self.mps),
                                   self.backend, self.device, warm_shapes=False)
            worker = WorkerHandle(wspec, self.work / "logs" / f"{wspec.name}.log")
            self._workers[key] = worker
            (ready,) = start_workers([worker], self.startup_timeout_s)
            self.versions = ready.versions
        return self._workers[key]

    def measure(self, keep: bool = True) -> ProfileResult:
        """Every cell of the grid, one share group at a time, the machine's speed probed meanwhile.
        `keep=False`: stop each group's worker once its cells are timed (one at a time on the cores);
        else they are paused until the next call."""
        rows: list[tuple[Any, ...]] = []
        retimed = 0
        for worker in self._workers.values():
            worker.resume()
        speed = SpeedMonitor(self.cores)  # how fast the machine ran while measured (hwloop.speed)
        with speed:
            for key, pcts in self.groups.items():
                samples, again = _time_grid(self._worker(key), self.grid, self.cell_timeout_s, self.progress)
                if not keep:
                    self._workers.pop(key).stop()
                retimed += again
                for pct in pcts:
                    rows += [(self.spec.name, 1, pct, c.batch, c.seq_len, c.phase, *_stats(s)) for c, s in samples]
        for worker in self._workers.values():
            worker.pause()
        return ProfileResult(pd.DataFrame(rows, columns=list(PROFILE_COLUMNS)), self._meta(retimed, speed))

    def _meta(self, retimed: int, speed: SpeedMonitor) -> dict[str, Any]:
        backend = self.backend
        return {
            "kind": "measured",
            "engine": backend,
            "device": self.device,
            "partition": "cores" if self.device == "cpu" else self.partition,
            "host": host_info(),
            "cores_used": list(self.cores),
            "share_groups": {str(k): v for k, v in self.groups.items()},
            "share_unit": "cores" if self.device == "cpu" else f"{self.partition}_pct",
            "versions": self.versions,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "model_spec": asdict(self.spec),
            "grid": asdict(self.grid),
            "engine_config": self.cfg.to_dict(),
            "decode_context": "timed decode steps are consecutive: contexts seq_len - repeats//2 .. + repeats",
            "prefill_lengths": (f"timed repeats at seq_len + {list(PREFILL_OFFSETS)} (cycled), each length run once "
                                "untimed just before" if backend != "vllm" else "timed repeats at seq_len"),
            "step_timing": STEP_TIMING[backend],
            "latency_ms": f"median of the timed repeats; a cell whose repeats spread by more than {NOISY_SPREAD:.0%} "
                          "is timed again at the end of its share group, the quieter timing kept",
            "retimed_cells": retimed,
            "load_average": list(os.getloadavg()),
            "speed_probe_ms": speed.summary(),
        }


# A cell whose repeats spread by more than this (their std over their median) was disturbed while it
# was timed: another process took the core, or a share group's worker threads were still settling
# (a 2-core group's first cell, an 8-token prefill, once came out at 230 ms ± 60 where its
# neighbours took 7-9 ms; experiments.validate mode=split, 2026-12-03).
NOISY_SPREAD = 0.25


def spread(samples: Sequence[float]) -> float:
    """Std over median of a cell's timed repeats (0 for fewer than two)."""
    ms = np.asarray(samples, dtype=float)
    return float(ms.std(ddof=1) / np.median(ms)) if len(ms) > 1 and np.median(ms) > 0 else 0.0


def quieter(first: Sequence[float], again: Sequence[float]) -> Sequence[float]:
    """Of a noisy cell's two timings, the one whose repeats spread less."""
    return again if spread(again) < spread(first) else first


def _time_grid(worker: WorkerHandle, grid: Grid, cell_timeout_s: float, progress: Callable[[str], None] | None
               ) -> tuple[list[tuple[ProfileCmd, tuple[float, ...]]], int]:
    """Every cell of the grid on one started worker, then the noisy ones (`NOISY_SPREAD`) once more,
    the quieter timing kept: the samples per cell, and how many were timed again."""
    name = worker.spec.name

    def timed(cell: ProfileCmd) -> tuple[float, ...]:
        worker.send(cell)
        done: ProfileDone = worker.recv(cell_timeout_s, what=f"{cell.phase} b={cell.batch} s={cell.seq_len}")
        if progress:
            progress(f"{name} {cell.phase} batch={cell.batch} seq={cell.seq_len}: "
                     f"{1e3 * float(np.mean(done.samples_s)):.2f} ms")
        return done.samples_s

    out = [(cell, timed(cell)) for cell in grid.cells()]
    noisy = [i for i, (_, samples) in enumerate(out) if spread(samples) > NOISY_SPREAD]
    for i in noisy:
        cell, samples = out[i]
        out[i] = (cell, tuple(quieter(samples, timed(cell))))
    return out, len(noisy)


def _stats(samples: Sequence[float]) -> tuple[float, float, int, float, float]:
    """latency_ms is the median of the repeats: on a machine shared with other processes one
    preempted step (measured: 230 ms among 3 ms steps) would move a mean of a few repeats by
    tens of times the cell's own variation; the engine's step is what the profile is for."""
    ms = 1e3 * np.asarray(samples, dtype=float)
    std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
    return float(np.median(ms)), std, len(ms), float(ms.min()), float(ms.max())


def host_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": platform.node(), "cpu_model": model, "cpu_count": os.cpu_count(),
            "cores_available": len(available_cores()), "platform": platform.platform(),
            "python": platform.python_version()}


def write_profile(result: ProfileResult, path: str | Path) -> Path:
    """Parquet (metadata under `muxsim.meta`) or CSV (+ `.meta.json`), like the Workload files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(result.meta, default=str)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(result.table, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"muxsim.meta": meta.encode()})
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        result.table.to_csv(path, index=False)
        path.with_suffix(".meta.json").write_text(json.dumps(result.meta, default=str, indent=2))
    else:
        raise ProfileError(f"{path}: unknown profile format {path.suffix!r} (use .parquet or .csv)")
    return path


def read_profile(path: str | Path) -> ProfileResult:
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"muxsim.meta")
        return ProfileResult(table.to_pandas(), json.loads(raw) if raw else {})
    side = path.with_suffix(".meta.json")
    return ProfileResult(pd.read_csv(path), json.loads(side.read_text()) if side.exists() else {})
