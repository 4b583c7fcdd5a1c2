"""MuxServe's split execution on real engines: a prefill process and a decode process per LLM.

Both processes of an LLM hold the same model (the torch engine, `hwloop.torch_engine`, built from
the same spec and seed, so the same weights) and map the unit's one KV pool (`hwloop.kv_pool`).
Neither owns a KV cache: every command names the pool blocks each request reads and writes.

- A **prefill** worker runs `PrefillCmd`: it computes the prompts (the whole context for a
  recomputed request), writes their K and V into the blocks of their block tables, and returns
  each request's first token.
- A **decode** worker runs `DecodeCmd`: for each request, the token to feed, the tokens its blocks
  hold and its block table; it appends one token per step at that position and attends over the
  blocks through the table. The handoff from prefill to decode is the block table: no KV byte
  moves between the processes (tests/test_split.py checks both map the same storage).
- Like the mixed-mode worker (`hwloop.worker`), it lives the life of `hwloop.process`: pinned to
  its cores (or given its MPS percentage) before torch loads, started in its own session, dying
  with the runner, serving until `Stop` or until the runner's end of the socket closes. A decode run (`max_steps > 1`) repeats the step
  without a round trip, stopping after a step in which a request finished or when a `Yield` waits.
- The worker keeps no state between commands: the runner sends every table and token each time,
  so a command can never act on a table the runner has since changed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from hwloop.kv_pool import PoolHandle, storage_identity
from hwloop.process import Answer, Ready, WorkerProcess, pinned_cores, worker_main
from policies.specs import ModelSpec

Phase = Literal["prefill", "decode"]
DTYPE_OF_BYTES = {2: "bfloat16", 4: "float32"}  # a spec's bytes per value → the engine's dtype


@dataclass(frozen=True)
class SplitWorkerSpec:
    name: str  # "<llm>/<phase>", used in every message about this worker
    llm: str
    phase: Phase
    model: ModelSpec
    pool: PoolHandle
    dtype: str = "bfloat16"
    device: str = "cpu"
    max_len: int = 0  # 0: the model's context
    seed: int = 0
    cores: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitReady(Ready):
    pool_identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the pool's memfd as this worker maps it


@dataclass(frozen=True)
class PrefillItem:
    request_id: int
    tokens: tuple[int, ...]  # the whole context: the prompt, plus what was generated before a preemption
    blocks: tuple[int, ...]  # its block table: exactly ⌈len(tokens) / 32⌉ chunks


@dataclass(frozen=True)
class PrefillCmd:
    items: tuple[PrefillItem, ...]


@dataclass(frozen=True)
class DecodeItem:
    request_id: int
    token: int  # the last token generated, fed now
    held: int  # tokens whose K and V its blocks hold: the new token goes at this position
    blocks: tuple[int, ...]  # its block table, covering every position the run may write
    remaining: int  # tokens still to generate: the run stops after the step that ends one


@dataclass(frozen=True)
class DecodeCmd:
    items: tuple[DecodeItem, ...]
    max_steps: int = 1


@dataclass(frozen=True)
class PhaseDone:
    t_start: float  # time.monotonic() in the worker (system-wide on Linux)
    t_end: float
    t_first_end: float  # end of the first step: the first-token time of a prefill
    step_s: tuple[float, ...]
    new_tokens: dict[int, tuple[int, ...]]  # request id -> tokens produced, in order
    finished: tuple[int, ...]  # requests whose last token was produced

    @property
    def steps(self) -> int:
        return len(self.step_s)


# ---- worker side --------------------------------------------------------------------------------


class PhaseServer:
    """A prefill or decode engine over the shared pool."""

    def __init__(self, spec: SplitWorkerSpec) -> None:
        import torch

        from hwloop.kv_pool import attach
        from hwloop.torch_engine import TorchEngine

        self.torch = torch
        self.engine = TorchEngine(spec.model, dtype=spec.dtype, device=spec.device, max_len=spec.max_len or None,
                                  seed=spec.seed)
        self.pool = attach(spec.pool)
        self.engine.layout(spec.pool.block_bytes)  # refuses a model the pool cannot page, before Ready
        self._warm_up(spec.pool.block_bytes)

    def _warm_up(self, block_bytes: int) -> None:
        """One prefill and one decode on a private scratch pool, so the first timed step is not a cold one."""
        scratch = self.torch.zeros(self.engine.layout(block_bytes).chunk_blocks, block_bytes, dtype=self.torch.uint8,
                                   device=self.engine.device)
        table = [list(range(len(scratch)))]
        logits = self.engine.prefill_paged(scratch, table, [[3] * 8])
        self.engine.decode_paged(scratch, table, [8], logits.argmax(-1))
        self.engine.sync()

    def _tokens(self, logits: Any) -> list[int]:
        return logits.argmax(dim=-1).cpu().tolist()  # the device-to-host copy synchronises the step

    def prefill(self, cmd: PrefillCmd) -> PhaseDone:
        t0 = time.monotonic()
        with self.engine.on_stream():
            first = self._tokens(self.engine.prefill_paged(self.pool, [it.blocks for it in cmd.items],
                                                           [it.tokens for it in cmd.items]))
        t1 = time.monotonic()
        return PhaseDone(t0, t1, t1, (t1 - t0,), {it.request_id: (t,) for it, t in zip(cmd.items, first, strict=True)},
                         ())

    def decode(self, cmd: DecodeCmd, interrupted: Any) -> PhaseDone:
        items = list(cmd.items)
        tables = [it.blocks for it in items]
        held = [it.held for it in items]
        last = [it.token for it in items]
        remaining = [it.remaining for it in items]
        produced: dict[int, list[int]] = {it.request_id: [] for it in items}
        durations: list[float] = []
        finished: list[int] = []
        t_start = t_end = t_first = time.monotonic()
        for step in range(cmd.max_steps):
            t0 = time.monotonic()
            with self.engine.on_stream():
                out = self._tokens(self.engine.decode_paged(self.pool, tables, held, self.torch.tensor(last)))
            t_end = time.monotonic()
            durations.append(t_end - t0)
            if step == 0:
                t_start, t_first = t0, t_end
            for i, it in enumerate(items):
                produced[it.request_id].append(out[i])
                remaining[i] -= 1
                if remaining[i] == 0:
                    finished.append(it.request_id)
            held = [n + 1 for n in held]
            last = out
            if finished or interrupted():
                break
        return PhaseDone(t_start, t_end, t_first, tuple(durations), {k: tuple(v) for k, v in produced.items()},
                         tuple(finished))


def _build(spec: SplitWorkerSpec) -> tuple[SplitReady, Answer]:
    """Build the phase's engine over the pool; answer the commands of that phase only."""
    t0 = time.perf_counter()
    import torch

    t_import = time.perf_counter() - t0
    server = PhaseServer(spec)
    identity = storage_identity(spec.pool.fd) if spec.pool.device == "cpu" else (0, 0)
    ready = SplitReady(os.getpid(), pinned_cores(), t_import, server.engine.build_s, torch.get_num_threads(),
                       dict(server.engine.info), pool_identity=identity)

    def answer(msg: object, interrupted: Any) -> object:
        if isinstance(msg, PrefillCmd) and spec.phase == "prefill":
            return server.prefill(msg)
        if isinstance(msg, DecodeCmd) and spec.phase == "decode":
            return server.decode(msg, interrupted)
        raise TypeError(f"worker {spec.name}: a {spec.phase} worker got {type(msg).__name__}")

    return ready, answer


def main(fd: int) -> None:
    worker_main(fd, _build)


# ---- runner side --------------------------------------------------------------------------------


class SplitWorkerHandle(WorkerProcess):
    """The runner's end of one prefill or decode worker, which inherits the unit's pool descriptor
    at the same number (`hwloop.process.WorkerProcess`)."""

    entry = "hwloop.split_worker"
    ready_type = SplitReady
    spec: SplitWorkerSpec

    def inherited_fds(self) -> tuple[int, ...]:
        return (self.spec.pool.fd,) if self.spec.pool.fd >= 0 else ()
