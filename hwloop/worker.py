"""Engine worker processes: one OS process per served LLM, holding one in-process vLLM engine.

Why a process per engine: compute partitioning works per process (an MPS client's thread
percentage, a CPU affinity mask), and an engine crash must not take the runner down with it.

A worker lives the life every worker process does (`hwloop.process`: spawned in its own session,
pinned before torch loads, dying with the runner): it receives its `WorkerSpec`, builds its engine,
answers `Ready`, then serves `StepCmd` (add these requests, abort those, run exactly one engine
step) and `ProfileCmd` (time one cell of the profiler's grid) until `Stop`.

Execution semantics of a step (the "mixed" mode of policies.view): the engine holds exactly the
requests the runner has admitted and not yet finished or preempted; one `StepCmd` adds the newly
admitted ones and runs one `LLMEngine.step()`, which prefills the new requests (first token) and
decodes every running one (one token each). The worker checks that this is what happened and
reports any deviation (vLLM preempting, chunking a prefill, a missing or extra token) in
`StepDone.anomalies`, so the runner can refuse to record a run vLLM reordered behind its back.
A decode run (`max_steps > 1`) is the same step repeated without a round trip to the runner, which
only asks for one when the policy would relaunch that same step anyway (see hwloop.runner).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hwloop.engine import EngineConfig, StepOutput, synthetic_prompt
from hwloop.process import Answer, Ready, WorkerProcess, pinned_cores, worker_main

# ---- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    name: str  # the served LLM's name, used in every message about this worker
    engine: EngineConfig
    cores: tuple[int, ...] = ()  # CPU affinity; () = leave as inherited
    env: dict[str, str] = field(default_factory=dict)
    # "vllm", or "torch" / "torch-paged" (over a private block pool): hwloop.torch_engine, which answers ProfileCmd only (no request-level API
    # yet), on `device` ("cpu" | "cuda"); a vLLM engine runs where its build runs.
    backend: str = "vllm"
    device: str = "cpu"
    # vLLM: build every step shape before serving (`VLLMEngine.warm_shapes`). The profiler's workers
    # do not: each cell warms its own shape, and their token budget covers its largest cell.
    warm_shapes: bool = True


@dataclass(frozen=True)
class Admit:
    request_id: int
    prompt_tokens: int
    context_tokens: int  # prompt + tokens generated before a preemption (recomputed now)
    max_new_tokens: int


@dataclass(frozen=True)
class StepCmd:
    """Preempt, admit, then run one engine step, or up to `max_steps` for a decode run.

    A run stops early after a step in which a request finished, or when a `Yield` is waiting.
    """

    admit: tuple[Admit, ...]
    preempt: tuple[int, ...] = ()
    max_steps: int = 1


@dataclass(frozen=True)
class StepDone:
    t_start: float  # time.monotonic() in the worker; CLOCK_MONOTONIC is system-wide on Linux
    t_end: float
    t_first_end: float  # end of the first step: the first-token time of admitted requests
    step_s: tuple[float, ...]  # duration of each step
    tokens: dict[int, int]  # request id -> tokens produced over the run
    finished: tuple[int, ...]
    anomalies: tuple[str, ...] = ()

    @property
    def steps(self) -> int:
        return len(self.step_s)


@dataclass(frozen=True)
class ProfileCmd:
    phase: Literal["prefill", "decode"]
    batch: int
    seq_len: int
    warmup: int
    repeats: int


@dataclass(frozen=True)
class ProfileDone:
    samples_s: tuple[float, ...]


# ---- worker side --------------------------------------------------------------------------------


class EngineServer:
    """The worker's state: which requests its engine holds, and the tokens each has so far.

    Token ids are kept so that a preempted request can be re-added with its whole context as the
    prompt (vLLM's recompute): the same work the simulator charges for a preemption.
    """

    def __init__(self, engine: Any) -> None:  # hwloop.engine.VLLMEngine, or anything shaped like it
        self.engine = engine
        self.vocab = engine.config.vocab_size
        self.tokens: dict[int, list[int]] = {}
        self.attempt: dict[int, int] = {}
        self.resident: set[int] = set()

    def key(self, rid: int) -> str:
        return f"{rid}.{self.attempt.get(rid, 0)}"

    def step(self, cmd: StepCmd, interrupted: Callable[[], bool] = lambda: False) -> StepDone:
        anomalies: list[str] = []
        gone = [rid for rid in cmd.preempt if rid in self.resident]
        if gone:
            self.engine.abort(self.key(rid) for rid in gone)
        for rid in gone:
            self.resident.discard(rid)
            self.attempt[rid] = self.attempt.get(rid, 0) + 1
        for a in cmd.admit:
            ids = self.tokens.setdefault(a.request_id, synthetic_prompt(a.request_id, a.prompt_tokens, self.vocab))
            if len(ids) != a.context_tokens:
                anomalies.append(f"request {a.request_id}: runner says context {a.context_tokens}, "
                                 f"worker holds {len(ids)} tokens")
            self.engine.add(self.key(a.request_id), list(ids), a.max_new_tokens)
            self.resident.add(a.request_id)
        durations: list[float] = []
        total: dict[int, int] = {}
        finished: list[int] = []
        t_start = t1 = t_first = time.monotonic()
        for i in range(cmd.max_steps):
            t0 = time.monotonic()
            outputs = self.engine.step()
            t1 = time.monotonic()
            durations.append(t1 - t0)
            if i == 0:
                t_start, t_first = t0, t1
            produced, done = self._apply(outputs, anomalies)
            for rid, n in produced.items():
                total[rid] = total.get(rid, 0) + n
            finished += done
            if done or not self.resident or interrupted():
                break
        return StepDone(t_start, t1, t_first, tuple(durations), total, tuple(finished), tuple(anomalies))

    def _apply(self, outputs: Sequence[StepOutput], anomalies: list[str]) -> tuple[dict[int, int], list[int]]:
        produced: dict[int, int] = {}
        finished: list[int] = []
        for out in outputs:
            rid = int(out.key.split(".")[0])
            if rid not in self.resident or out.key != self.key(rid):
                anomalies.append(f"output for {out.key}, which the engine should not hold")
                continue
            produced[rid] = len(out.new_tokens)
            self.tokens[rid].extend(out.new_tokens)
            if out.finished:
                finished.append(rid)
        for rid in self.resident:
            if produced.get(rid, 0) != 1:
                anomalies.append(f"request {rid} produced {produced.get(rid, 0)} tokens in one step "
                                 f"(vLLM preempted or chunked it)")
        for rid in finished:
            self.resident.discard(rid)
            del self.tokens[rid]
            self.attempt.pop(rid, None)
        return produced, finished


def build_engine(spec: WorkerSpec) -> tuple[Any, Any]:
    """The engine `StepCmd`s drive (None for the torch backend) and the profiler's `StepEngine`
    over it, warmed up."""
    if spec.backend in ("torch", "torch-paged"):
        from hwloop.torch_engine import PagedStepEngine, TorchStepEngine

        step_engine = PagedStepEngine if spec.backend == "torch-paged" else TorchStepEngine
        return None, step_engine.for_worker(spec.engine, spec.device)
    if spec.backend != "vllm":
        raise ValueError(f"worker {spec.name}: unknown backend {spec.backend!r} (vllm | torch)")
    from hwloop.engine import VLLMEngine
    from hwloop.profiler import VLLMStepEngine

    engine = VLLMEngine(spec.engine)
    warm_up(engine)
    if spec.warm_shapes:
        engine.warm_shapes()
        engine.build_s += engine.warm_s
    return engine, VLLMStepEngine(engine)


def _versions() -> dict[str, str]:
    import torch
    import vllm

    return {"torch": torch.__version__, "vllm": vllm.__version__}


def _build(spec: WorkerSpec) -> tuple[Ready, Answer]:
    """Build the engine; answer `StepCmd`s (vLLM only) and `ProfileCmd`s."""
    engine, stepper = build_engine(spec)
    import torch

    built = engine if engine is not None else stepper.engine
    versions = stepper.engine.info if engine is None else _versions()
    ready = Ready(os.getpid(), pinned_cores(), built.import_s, built.build_s, torch.get_num_threads(), versions,
                  str(rendezvous_file() or ""))
    server = EngineServer(engine) if engine is not None else None

    def answer(msg: object, interrupted: Callable[[], bool]) -> object:
        if isinstance(msg, StepCmd):
            if server is None:
                raise TypeError(f"worker {spec.name}: the {spec.backend} backend answers ProfileCmd only")
            return server.step(msg, interrupted)
        if isinstance(msg, ProfileCmd):
            from hwloop.profiler import time_cell

            return ProfileDone(time_cell(stepper, msg))
        raise TypeError(f"worker {spec.name}: unknown message {type(msg).__name__}")

    return ready, answer


def warm_up(engine: Any) -> None:
    """One short request through prefill and decode, so the first timed step is not a cold one."""
    engine.add("warmup", synthetic_prompt(0, 16, engine.config.vocab_size), 3)
    while engine.has_work():
        engine.step()


def rendezvous_file() -> Path | None:
    """The file:// rendezvous vLLM's single-process engine leaves in the temp folder (its CPU worker
    records the name in VLLM_DIST_IDENT). A fast exit, or a killed worker, would leave it behind."""
    ident = os.environ.get("VLLM_DIST_IDENT", "")
    return Path(tempfile.gettempdir(), ident) if ident.startswith("vllm_dist_") else None


def main(fd: int) -> None:
    worker_main(fd, _build, cleanup=_remove_rendezvous)


def _remove_rendezvous() -> None:
    if (path := rendezvous_file()) is not None:
        path.unlink(missing_ok=True)


# ---- runner side --------------------------------------------------------------------------------


class WorkerHandle(WorkerProcess):
    """The runner's end of one engine worker (`hwloop.process.WorkerProcess`)."""

    entry = "hwloop.worker"
    spec: WorkerSpec
