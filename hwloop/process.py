"""Worker processes, both ends: how the runners start, message, diagnose and reap their workers.

Both kinds of worker, the mixed-mode vLLM engine (`hwloop.worker`) and the split-mode prefill or
decode engine (`hwloop.split_worker`), live the same life; only what they build and which commands
they answer differ. That life is written here once:

1. the runner starts `python -c "import <module>; main(FD)"` in its own session (a Ctrl-C in the
   terminal reaches only the runner, which then stops the workers in order instead of having them
   die mid-step with tracebacks), with a socket at descriptor FD, and sends the worker's spec;
2. the worker asks Linux to kill it when the runner goes (PR_SET_PDEATHSIG), pins itself to its
   cores and sets its env (OpenMP, MPS) *before* torch is imported, since OpenMP reads its settings
   when the library loads; it builds its engine and answers `Ready` (with start-up times);
3. it answers commands until `Stop` or until the runner's end of the socket closes. Between the
   steps of a decode run it peeks for a `Yield` (`Inbox.interrupted`), which ends the run;
4. any exception in the worker goes back as `Failed` (its traceback); the runner raises it, or a
   crash, a broken socket or a timeout, as a `WorkerError` naming the worker, its pid, its exit
   status and the last lines of its log.
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
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---- messages both kinds of worker use ----------------------------------------------------------


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
class Yield:
    """End the current run after the step in progress (something changed on the unit)."""


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Failed:
    error: str  # formatted traceback from the worker


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm and `timeout` send), raised where a run is, so it stops as on Ctrl-C: a
    caller that keeps what finished on Ctrl-C does so here too. The one such class of every command
    (`experiments.interrupt`) and runner (`hwloop.replay`)."""


class WorkerError(RuntimeError):
    """A worker died or failed; the message names it, its pid and exit status, and its last log lines."""


# ---- worker side --------------------------------------------------------------------------------

# Answers one command; the callable it is given tells whether a `Yield` (or any message) is waiting.
Answer = Callable[[object, Callable[[], bool]], object]


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


def serve(conn: mpc.Connection, build: Callable[[Any], tuple[Ready, Answer]]) -> int:
    """Receive the spec, pin and set the env, `build` the engine (which returns `Ready` and the
    function answering each command), then answer until `Stop` or the runner is gone."""
    spec = conn.recv()
    if spec.cores:
        os.sched_setaffinity(0, spec.cores)
    os.environ.update(spec.env)
    try:
        ready, answer = build(spec)
        conn.send(ready)
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
            conn.send(answer(msg, inbox.interrupted))
    except Exception:
        conn.send(Failed(traceback.format_exc()))
        return 1


def pinned_cores() -> tuple[int, ...]:
    """The cores this process may run on, as `Ready` reports them."""
    return tuple(sorted(os.sched_getaffinity(0)))


def worker_main(fd: int, build: Callable[[Any], tuple[Ready, Answer]],
                cleanup: Callable[[], None] = lambda: None) -> None:
    """Serve, `cleanup`, then leave at once: a clean vLLM/torch teardown takes seconds and frees
    nothing the OS would not."""
    _die_with_parent()
    code = serve(mpc.Connection(fd), build)
    cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the runner goes away, however it goes."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ---- runner side --------------------------------------------------------------------------------


class WorkerProcess:
    """The runner's end of one worker: start, message, diagnose, and always reap.

    A kind of worker names the module whose `main(FD)` it runs (`entry`), the `Ready` it answers
    with (`ready_type`) and any descriptor the worker must inherit (`inherited_fds`).
    """

    entry: str  # run as `-c`, not `-m`: messages must pickle as that module's, not __main__'s
    ready_type: type[Ready] = Ready

    def __init__(self, spec: Any, log_path: str | Path, unit: int = -1) -> None:
        self.spec = spec  # has .name, .cores and .env; pickled to the worker
        self.unit = unit
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: mpc.Connection | None = None
        self.ready: Ready | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def inherited_fds(self) -> tuple[int, ...]:
        return ()

    def start(self) -> None:
        parent, child = socket.socketpair()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"import sys, {self.entry} as w; w.main(int(sys.argv[1]))",
                 str(child.fileno())],
                pass_fds=(child.fileno(), *self.inherited_fds()), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, **self.spec.env}, start_new_session=True)
        child.close()
        self.conn = mpc.Connection(parent.detach())
        self.conn.send(self.spec)

    def wait_ready(self, timeout_s: float) -> Ready:
        reply = self.recv(timeout_s, what="start-up")
        if not isinstance(reply, self.ready_type):
            raise WorkerError(f"worker {self.describe()}: expected {self.ready_type.__name__}, "
                              f"got {type(reply).__name__}")
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

    def pause(self) -> None:
        """Freeze every thread of the worker (SIGSTOP) while it has nothing to do: an idle vLLM
        worker's own threads (torch's gloo loops) still took 0.6-0.9% of a core each (four idle
        profile workers, 10 s of /proc/PID/stat, 2026-12-04), on the cores other engines are timed on."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause` (harmless on a worker that is not paused)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self, grace_s: float = 5.0) -> None:
        """Ask politely, then SIGTERM, then SIGKILL; always reaps, and removes what a killed worker
        could not. Safe to call twice, and on a paused worker."""
        if self.proc is None:
            return
        self.resume()
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


def start_workers(handles: Sequence[WorkerProcess], timeout_s: float) -> list[Ready]:
    """Start the workers in waves and wait for every `Ready`: engines on different cores build in
    parallel, engines pinned to a shared core one after another, in the order given.

    Why: two engines building at once on the same cores run their OpenMP threads against each
    other, and the spinning threads slow both many times over. On the 2-core machine, two vLLM
    engines with 2 threads each on both cores took about 6 minutes to build their step shapes
    together (the temporal runs of a mixed validation), where one engine per core took about a
    minute. Workers without cores (GPU workers) share none and all build at once.
    """
    deadline = time.monotonic() + timeout_s
    readies: dict[int, Ready] = {}
    waiting = list(handles)
    while waiting:
        wave: list[WorkerProcess] = []
        taken: set[int] = set()
        for h in waiting:  # a worker waits for every earlier one on its cores, so the order holds
            if not taken & set(h.spec.cores):
                wave.append(h)
            taken |= set(h.spec.cores)
        for h in wave:
            h.start()
        for h in wave:
            readies[id(h)] = h.wait_ready(max(0.1, deadline - time.monotonic()))
        waiting = [h for h in waiting if h not in wave]
    return [readies[id(h)] for h in handles]
