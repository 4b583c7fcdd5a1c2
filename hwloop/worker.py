"""Engine worker processes: one OS process per served LLM, holding one in-process vLLM engine.

Why a process per engine: compute partitioning works per process (an MPS client's thread
percentage, a CPU affinity mask), and an engine crash must not take the runner down with it.

Life of a worker (`hwloop.worker.main(FD)` in a fresh interpreter, pickled messages over a socket):
1. it receives its `WorkerSpec`, pins itself to its cores and sets its env (OpenMP, MPS) *before*
   torch is imported, since OpenMP reads its settings when the library loads;
2. it builds its engine and answers `Ready` (with start-up times);
3. it serves `StepCmd` (add these requests, abort those, run exactly one engine step) and
   `ProfileCmd` (time one cell of the profiler's grid) until `Stop` or until the runner's end of
   the socket closes. It also dies with the runner (PR_SET_PDEATHSIG), so no engine outlives it.

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

import contextlib
import ctypes
import multiprocessing.connection as mpc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hwloop.engine import EngineConfig, StepOutput, synthetic_prompt

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


@dataclass(frozen=True)
class Ready:
    pid: int
    cores: tuple[int, ...]
    import_s: float
    build_s: float
    torch_threads: int
    versions: dict[str, str]
    rendezvous: str = ""  # vLLM's file:// rendezvous; removed by whoever outlives the worker


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
class Yield:
    """End the current run after the step in progress (something changed on the unit)."""


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


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Failed:
    error: str  # formatted traceback from the worker


class WorkerError(RuntimeError):
    """A worker died or failed; the message names it, its pid and exit status, and its last log lines."""


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


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the runner goes away, however it goes."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
    return engine, VLLMStepEngine(engine)


def _versions() -> dict[str, str]:
    import torch
    import vllm

    return {"torch": torch.__version__, "vllm": vllm.__version__}


def serve(conn: mpc.Connection) -> int:
    spec: WorkerSpec = conn.recv()
    if spec.cores:
        os.sched_setaffinity(0, spec.cores)
    os.environ.update(spec.env)
    try:
        engine, stepper = build_engine(spec)
        import torch

        built = engine if engine is not None else stepper.engine
        versions = stepper.engine.info if engine is None else _versions()
        conn.send(Ready(os.getpid(), tuple(sorted(os.sched_getaffinity(0))), built.import_s,
                        built.build_s, torch.get_num_threads(), versions, str(rendezvous_file() or "")))
        server = EngineServer(engine) if engine is not None else None
        inbox = Inbox(conn)
        while True:
            try:
                msg = inbox.next()
            except EOFError:
                return 0  # the runner is gone
            if isinstance(msg, Stop):
                return 0
            if isinstance(msg, Yield):
                continue  # it came after the run it was meant for had ended
            if isinstance(msg, StepCmd):
                if server is None:
                    raise TypeError(f"worker {spec.name}: the {spec.backend} backend answers ProfileCmd only")
                conn.send(server.step(msg, inbox.interrupted))
            elif isinstance(msg, ProfileCmd):
                from hwloop.profiler import time_cell

                conn.send(ProfileDone(time_cell(stepper, msg)))
            else:
                raise TypeError(f"worker {spec.name}: unknown message {type(msg).__name__}")
    except Exception:
        conn.send(Failed(traceback.format_exc()))
        return 1


class Inbox:
    """Messages from the runner; `interrupted` peeks between the steps of a run without losing any."""

    def __init__(self, conn: mpc.Connection) -> None:
        self.conn = conn
        self.pending: list[object] = []

    def next(self) -> object:
        return self.pending.pop(0) if self.pending else self.conn.recv()

    def interrupted(self) -> bool:
        if not self.conn.poll(0):
            return False
        msg = self.conn.recv()
        if not isinstance(msg, Yield):
            self.pending.append(msg)
        return True


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
    """Serve, then leave at once: a clean vLLM/torch teardown takes seconds and frees nothing the
    OS would not."""
    _die_with_parent()
    code = serve(mpc.Connection(fd))
    if (path := rendezvous_file()) is not None:
        path.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- runner side --------------------------------------------------------------------------------


class WorkerHandle:
    """The runner's end of one worker: start, message, diagnose, and always reap.

    The worker runs in its own session, so a Ctrl-C in the terminal reaches only the runner, which
    then stops the workers in order instead of having them die mid-step with tracebacks.
    """

    def __init__(self, spec: WorkerSpec, log_path: str | Path, unit: int = -1) -> None:
        self.spec = spec
        self.unit = unit
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: mpc.Connection | None = None
        self.ready: Ready | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> None:
        parent, child = socket.socketpair()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                # -c rather than -m: messages must pickle as hwloop.worker.*, not __main__.*
                [sys.executable, "-c", "import sys, hwloop.worker as w; w.main(int(sys.argv[1]))",
                 str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.spec.env}, start_new_session=True)
        child.close()
        self.conn = mpc.Connection(parent.detach())
        self.conn.send(self.spec)

    def wait_ready(self, timeout_s: float) -> Ready:
        reply = self.recv(timeout_s, what="start-up")
        if not isinstance(reply, Ready):
            raise WorkerError(f"worker {self.describe()}: expected Ready, got {type(reply).__name__}")
        self.ready = reply
        return reply

    def send(self, msg: object) -> None:
        assert self.conn is not None
        try:
            self.conn.send(msg)
        except OSError:
            raise WorkerError(self.failure("the connection broke while sending")) from None

    def recv(self, timeout_s: float | None = None, what: str = "a reply") -> Any:
        """The next reply; a crash, a `Failed` or a timeout becomes a WorkerError naming the worker."""
        assert self.conn is not None
        if timeout_s is not None and not self.conn.poll(timeout_s):
            raise WorkerError(self.failure(f"no {what} within {timeout_s:g} s"))
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            raise WorkerError(self.failure(f"it exited while the runner waited for {what}")) from None
        if isinstance(reply, Failed):
            raise WorkerError(f"worker {self.describe()} raised:\n{reply.error.rstrip()}")
        return reply

    def describe(self) -> str:
        pid = self.proc.pid if self.proc else "?"
        where = f", unit {self.unit}" if self.unit >= 0 else ""
        return f"{self.name!r} (pid {pid}{where})"

    def failure(self, what: str) -> str:
        """Why the worker is gone, in one message: its exit status and the end of its log."""
        status = ""
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                code = None
            if code is None:
                status = "still running"
            elif code < 0:
                status = f"killed by {signal.Signals(-code).name}"
            else:
                status = f"exit code {code}"
        return (f"worker {self.describe()} failed: {what} ({status}); "
                f"last lines of {self.log_path}:\n{log_tail(self.log_path)}")

    def stop(self, grace_s: float = 5.0) -> None:
        """Ask politely, then SIGTERM, then SIGKILL; always reaps, and removes what a killed worker
        could not. Safe to call twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.send(Stop())
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.ready is not None and self.ready.rendezvous and self.proc.poll() is not None:
            Path(self.ready.rendezvous).unlink(missing_ok=True)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "  (no log)"
    keep = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(f"  {ln}" for ln in keep) or "  (empty log)"


def start_workers(handles: Sequence[WorkerHandle], timeout_s: float) -> list[Ready]:
    """Start all workers at once (engines build in parallel), then wait for every `Ready`."""
    for h in handles:
        h.start()
    deadline = time.monotonic() + timeout_s
    return [h.wait_ready(max(0.1, deadline - time.monotonic())) for h in handles]

