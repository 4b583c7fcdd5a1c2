"""Compute partitioning: how a placement's SM share becomes a worker process's slice of a device.

- NVIDIA GPU: every worker is an MPS client whose `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` is its
  share, under an MPS control daemon that the runner starts and stops itself (`MPSDaemon`), with
  its pipe and log folders in a temporary folder it owns, so it never touches a daemon it did not
  start.
- CPU: the CPU analogue of an SM share is a set of cores. The whole worker process is pinned to
  them (affinity set before torch is imported, OpenMP told to use exactly those cores), because
  measured on the project's 2-core machine, two engines whose OpenMP threads share cores run 4.5×
  slower than either alone (DESIGN.md). Shares round *down* to whole cores (at least one), so a
  worker never gets more compute than its share; workers whose core sets still overlap must not
  run at the same time, and the runner time-slices them (`overlapping`).

Everything here is pure except `MPSDaemon`, so the env a worker gets is unit-testable anywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from policies.placement import SM_UNIT_PCT, LLMPlacement

Device = Literal["cpu", "cuda"]


class PartitionError(RuntimeError):
    """A share that cannot be given (no cores, no MPS daemon); the message names worker and cause."""


@dataclass(frozen=True)
class Slice:
    """One worker's part of a unit: the SM share it was started with and, on CPU, its cores."""

    share_pct: int
    cores: tuple[int, ...] = ()  # CPU only
    gpus: tuple[int, ...] = ()  # CUDA only: the unit's GPU indices
    env: dict[str, str] = field(default_factory=dict)


def worker_share_pct(llm: LLMPlacement, exclusive: bool) -> int:
    """The fixed share a mixed-mode worker runs at: whole units, as the policy launches it.

    A process's MPS percentage (or core set) cannot change once it runs, so the runner has to know
    the share of all of its future launches at start: temporal policies (`exclusive`) launch every
    job on the whole unit; ADBS launches a mixed step at the LLM's decode share.
    """
    if exclusive:
        return 100
    return min(100, -(-llm.decode_sm // SM_UNIT_PCT) * SM_UNIT_PCT)


def cores_for_share(share_pct: int, ncores: int) -> int:
    """Whole cores for a share: rounded down, at least one."""
    if ncores < 1:
        raise PartitionError("a unit needs at least one CPU core")
    return max(1, min(ncores, share_pct * ncores // 100))


def assign_cores(shares: Sequence[int], cores: Sequence[int]) -> list[tuple[int, ...]]:
    """Core sets for workers in placement order: consecutive, wrapping round the unit's cores.

    Disjoint whenever the shares fit (Σ cores ≤ len(cores)); beyond that the later workers wrap onto
    cores already given out, and `overlapping` says which pairs must take turns.
    """
    out: list[tuple[int, ...]] = []
    start = 0
    for share in shares:
        k = cores_for_share(share, len(cores))
        out.append(tuple(cores[(start + i) % len(cores)] for i in range(k)))
        start = (start + k) % len(cores)
    return out


def overlapping(a: Sequence[int], b: Sequence[int]) -> bool:
    return bool(set(a) & set(b))


# glibc malloc tunables of every worker: memory a step frees stays in the process for the next step.
# By default glibc maps each large block fresh (mmap above a threshold that moves with what was
# freed before) and hands freed heap back to the kernel, so a step's tensors are new pages, each
# zeroed in a page fault (4 KiB); how many a step pays depends on the worker's history, not on the
# step. The profile repeats one shape per cell; a served trace changes shapes every step. So the
# profile and the runner timed different allocators: split-mode decode steps ran 1.6x their profile
# at 1.3x saturation before this, 1.09x after (experiments.validate mode=split, one level, one
# repeat each). `python -m hwloop.bench_alloc` times both settings: paged decodes of batch 48-120,
# 26,000 faults and 106 ms a step by default, 560 faults and 83 ms with these (one core, once).
# Serving engines do the same (vLLM's CPU guide preloads tcmalloc).
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def cpu_env(cores: Sequence[int]) -> dict[str, str]:
    """OpenMP settings for a process pinned to `cores`: one thread per core.

    - The process affinity (set by the worker before torch loads) keeps every thread on these cores.
    - `OMP_NUM_THREADS` must be set, or vLLM drops torch to one thread for serving
      (vllm.utils.torch_utils).
    - `OMP_WAIT_POLICY` is left at libgomp's default (spin briefly, then sleep). Measured on 2
      cores with a tiny Llama: PASSIVE made a batch-1 decode step 4–5× slower (15–17 ms against
      3–4 ms: every one of the step's many small parallel regions has to wake a sleeping thread),
      and ACTIVE threads spin on after a step, stealing the cores from whoever runs there next.
    - `VLLM_CPU_OMP_THREADS_BIND` is only read by vLLM's multiprocess executor; it is set too so
      that an engine started that way binds the same cores.
    """
    return {
        "OMP_NUM_THREADS": str(len(cores)),
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores),
        **ALLOCATOR_ENV,
    }



def mps_env(share_pct: int, gpus: Sequence[int], pipe_dir: str | Path, log_dir: str | Path) -> dict[str, str]:
    """Env of one MPS client: its GPUs, its SM percentage, and the daemon it must talk to."""
    if not 1 <= share_pct <= 100:
        raise PartitionError(f"MPS thread percentage must be within 1..100, got {share_pct}")
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(share_pct),
        "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir),
        "CUDA_MPS_LOG_DIRECTORY": str(log_dir),
    }


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on (respects taskset/cgroups, unlike os.cpu_count)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def cpu_slices(llms: Sequence[LLMPlacement], exclusive: bool, cores: Sequence[int]) -> list[Slice]:
    shares = [worker_share_pct(x, exclusive) for x in llms]
    return [Slice(s, c, env=cpu_env(c)) for s, c in zip(shares, assign_cores(shares, cores), strict=True)]


def split_shares(llm: LLMPlacement, exclusive: bool) -> tuple[int, int]:
    """The fixed shares of a split-mode LLM's prefill and decode workers: whole units, as launched.

    ADBS launches a prefill at the LLM's prefill share and a decode at its decode share; the
    temporal policies launch every job on the whole unit.
    """
    if exclusive:
        return 100, 100
    return min(100, llm.prefill_units * SM_UNIT_PCT), min(100, llm.decode_units * SM_UNIT_PCT)


def check_cpu_share(worker: str, share_pct: int, ncores: int) -> None:
    """A CPU worker's share must be at least one whole core: below that, the only slice a process can
    be pinned to (one core) is more compute than its share, and a run would not be the placement's."""
    if share_pct * ncores < 100:
        raise PartitionError(f"{worker}: a {share_pct}% share of {ncores} core(s) is {share_pct * ncores / 100:.2g} "
                             f"of a core, which the cores cannot honour (give it at least "
                             f"{-(-100 // ncores // SM_UNIT_PCT) * SM_UNIT_PCT}%, or the unit more cores)")


def split_cpu_slices(llms: Sequence[LLMPlacement], exclusive: bool, cores: Sequence[int]) -> list[tuple[Slice, Slice]]:
    """(prefill, decode) slices per LLM: core sets in placement order, prefill then decode, as
    `assign_cores` gives them. Every share is checked first (`check_cpu_share`)."""
    shares = [split_shares(x, exclusive) for x in llms]
    for x, (pre, dec) in zip(llms, shares, strict=True):
        check_cpu_share(f"{x.name} prefill", pre, len(cores))
        check_cpu_share(f"{x.name} decode", dec, len(cores))
    sets = assign_cores([s for pair in shares for s in pair], cores)
    return [(Slice(pre, sets[2 * i], env=cpu_env(sets[2 * i])), Slice(dec, sets[2 * i + 1], env=cpu_env(sets[2 * i + 1])))
            for i, (pre, dec) in enumerate(shares)]


def split_cuda_slices(llms: Sequence[LLMPlacement], exclusive: bool, gpus: Sequence[int],
                      daemon: MPSDaemon | None) -> list[tuple[Slice, Slice]]:
    """(prefill, decode) MPS clients per LLM, each at its own thread percentage (without a daemon,
    each has the whole GPU)."""
    out = []
    for x in llms:
        pre, dec = split_shares(x, exclusive)
        out.append((gpu_slice(pre, gpus, daemon), gpu_slice(dec, gpus, daemon)))
    return out


def cuda_slices(llms: Sequence[LLMPlacement], exclusive: bool, gpus: Sequence[int],
                daemon: MPSDaemon | None) -> list[Slice]:
    """Without a daemon the workers share the GPUs unpartitioned (e.g. the spatial baseline)."""
    return [gpu_slice(worker_share_pct(x, exclusive), gpus, daemon) for x in llms]


def gpu_slice(share_pct: int, gpus: Sequence[int], daemon: MPSDaemon | None) -> Slice:
    """One GPU worker: an MPS client at `share_pct` of the daemon, or (no daemon) the whole GPUs."""
    env = (mps_env(share_pct, gpus, daemon.pipe_dir, daemon.log_dir) if daemon
           else {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)})
    return Slice(share_pct, gpus=tuple(gpus), env=env)


MPS_CONTROL = "nvidia-cuda-mps-control"  # the driver's MPS control program


class MPSDaemon:
    """An MPS control daemon owned by this process: started in a private folder, stopped on exit.

    Using private pipe/log folders keeps it apart from any system-wide daemon; `stop` is idempotent
    and safe to call from cleanup paths after a crash.
    """

    def __init__(self, root: str | Path | None = None, control: str = MPS_CONTROL) -> None:
        self.control = control
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="muxsim-mps-"))
        self.pipe_dir = self.root / "pipe"
        self.log_dir = self.root / "log"
        self.running = False

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def start(self) -> None:
        if shutil.which(self.control) is None:
            raise PartitionError(f"{self.control} not found: MPS needs the NVIDIA driver's MPS tools on PATH")
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([self.control, "-d"], env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise PartitionError(f"MPS daemon failed to start (exit {done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()[-500:]}")
        self.running = True

    def stop(self, wait_s: float = 3.0) -> None:
        """Ask the daemon to quit. It stops taking clients at once, but exits only once its clients
        have: a process that is itself a client (the split runner allocates the pool) would wait on
        itself for ever, so after `wait_s` the request is left to finish when this process exits
        (seen on an H200: a `quit` from a client process never returned)."""
        if self.running:
            self.running = False
            quit_ = subprocess.Popen([self.control], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, **self.env},
                                     start_new_session=True)
            assert quit_.stdin is not None
            quit_.stdin.write(b"quit\n")
            quit_.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                quit_.wait(timeout=wait_s)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> MPSDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
