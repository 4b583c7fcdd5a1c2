"""The runner's costs that a step profile of one engine alone does not contain, each measured on its own.

    python -m hwloop.terms turns --cores 0 1        # a step right after another engine's on the same cores
    python -m hwloop.terms idle --cores 0           # a step after the engine sat idle, by idle time
    python -m hwloop.terms dispatch --cores 0       # from the runner's send to the engine's step, by launch kind
    python -m hwloop.terms shapes --cores 0         # a step whose token count the engine never ran before
    python -m hwloop.terms beside --cores 0         # a step while another engine works on the other cores
    python -m hwloop.terms all --json terms.json    # all five (what experiments.validate stores with a profile)
    python -m hwloop.terms all --cores 0 --split    # the same on the split-mode workers (prefill and decode processes)
    python -m hwloop.terms mixed --cores 0          # a step admitting a prompt beside its decodes, against its parts

The profiler (`hwloop.profiler`) times steps of one engine back to back. The runner does more:
- **turns**: engines whose core sets overlap take turns, so a step often follows another engine's
  step on the same cores, whose weights and activations then fill the caches (and whose OpenMP
  threads just left the cores). Measured with a second engine of the same model on the same cores:
  a step following the other engine's against a step following its own, in adjacent pairs.
- **idle**: an engine that sat idle (no other engine on its cores meanwhile) starts colder than
  back to back: its OpenMP threads went to sleep after spinning, and other processes touched the
  caches. Measured as a step after sleeping `gap` seconds against the step just before the sleep,
  in pairs, at a few gaps.

- **shapes**: the first step an engine runs at a given token count (the rows of its matrix products)
  is slower than later ones of the same count: the CPU kernels are built per shape and cached
  (oneDNN's primitives for bf16). The profiler warms every cell up, so its times are the cached ones;
  a served trace keeps meeting new counts (each mixed step's prompts plus decodes). Measured as a
  prefill of a never-run token count against the same prefill repeated, at a few counts.

- **beside**: engines on *other* cores share the memory bandwidth and the last-level cache, so a
  step runs slower while one of them works. Measured as the engine's decode steps at a few batches
  and prefills at a few token counts, alone, then while a second engine of the model decodes a
  batch of 32 non-stop on the remaining cores, then alone again: a slowdown factor (beside ÷ alone)
  per step size in tokens. Needs cores outside the measured ones (none: no term).

Each extra is the median of paired differences (with their interquartile range): other processes'
load drifts over seconds, and a pair a few milliseconds apart sees nearly the same load.
- **dispatch**: the round trip a launch costs beside its step: from the runner sending a step
  command to the engine starting the step (the pipe, unpickling, waking the worker), plus from the
  step's end to the runner holding the reply; and for a launch that admits a request, vLLM adding
  it. Measured as the medians of `StepDone.t_start − t_send` and `t_recv − StepDone.t_end`
  (CLOCK_MONOTONIC is system-wide on Linux) for decode launches, and the excess of the first for
  launches admitting one request.

Each is an extra time charged to a job's first step by the simulator (`policies.cost.RunnerTerms`,
`sim.engine.Simulator(runner_terms=…)`), never fitted to a validation run: these numbers come from
these commands alone. The policy's own decision time is not among them (it is the same code in
both executors, and the simulator charges no time for it).

`mixed` is no term (not in `all`): it checks the cost formula of a step that prefills and decodes
at once, `policies.cost.mixed_step_time` (the parts' sum less the fixed cost of a step, paid once).
On one worker, per decode batch and prompt length, it times a decode step of the batch and right
after it the same step admitting one prompt, then, the batch finished, that prompt's prefill alone
and a decode of one request alone at the batch's context; all of them within a fraction of a second
of each other, every step shape warmed up first (so that `shapes` is not in it), and reports the
medians and the medians of each cycle's `plain sum / mixed` and `formula / mixed`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hwloop.engine import (
    FIRST_TOKEN_ID,
    STEP_TOKEN_MULTIPLE,
    engine_config,
    prompt_lengths,
    synthetic_prompt,
    write_model_dir,
)
from hwloop.kv_pool import PAD_TOKENS, BlockAllocator, KVPool
from hwloop.partition import available_cores, cpu_env
from hwloop.process import start_workers
from hwloop.split_worker import (
    DTYPE_OF_BYTES,
    DecodeCmd,
    DecodeItem,
    PhaseDone,
    PrefillCmd,
    PrefillItem,
    SplitWorkerHandle,
    SplitWorkerSpec,
)
from hwloop.worker import Admit, StepCmd, StepDone, WorkerHandle, WorkerSpec
from policies.cost import mixed_step_time
from policies.placement import blocks_for_tokens, blocks_per_chunk
from policies.specs import ModelSpec

# The idle times `idle` measures at: the simulator interpolates between them in log(gap)
# (`RunnerTerms.idle_extra`), and the cold start grows most between 20 ms and 0.5 s.
IDLE_GAPS_S = (0.002, 0.005, 0.02, 0.05, 0.2, 0.5)
SHAPE_TOKENS = (8, 32, 128, 512, 1536)  # the token counts `shapes` measures near (capped by the engine's budget)
BESIDE_BATCHES = (1, 8, 32, 96)  # the decode batches `beside` measures at (step tokens = batch)
BESIDE_PROMPT_TOKENS = (256, 1024)  # and the prefills (more tokens than any decode batch above)
BESIDE_LOAD_BATCH = 32  # the decode batch the neighbouring engine runs
MIXED_BATCHES = (1, 4, 32)  # the decode batches `mixed` measures at
MIXED_PROMPT_TOKENS = (16, 64, 256)  # and the prompt a step of each admits
MIXED_WARMUP = 2  # untimed cycles per batch first, so that every step shape a cycle runs is built
TERMS = ("turns", "idle", "dispatch", "shapes", "beside")


class Pair:
    """Workers (two unless told) of one model pinned to the same cores, each holding a decode batch."""

    def __init__(self, spec: ModelSpec, cores: Sequence[int], work: Path, batch: int, context: int,
                 budget: int, env: dict[str, str] | None = None, workers: int = 2) -> None:
        self.prefill_tokens = 2048
        self.pad_tokens = STEP_TOKEN_MULTIPLE  # the engine pads a step that prefills (`hwloop.engine`)
        cfg = engine_config(spec, write_model_dir(spec, work / "models"), max_batch=max(16, batch, *BESIDE_BATCHES),
                            pool_blocks=10**6, chunk_blocks=blocks_per_chunk(spec), prefill_tokens=self.prefill_tokens)
        self.max_context = spec.max_context
        self.cores, self.batch, self.context, self.budget = tuple(cores), batch, context, budget
        self.handles = [WorkerHandle(WorkerSpec(f"terms-{i}", cfg, self.cores, {**cpu_env(self.cores), **(env or {})}),
                                     work / "logs" / f"terms-{i}.log") for i in range(workers)]
        self._next_id = 0
        self._left = [0] * workers  # decode steps each worker's batch has left

    def __enter__(self) -> Pair:
        start_workers(self.handles, timeout_s=600)
        return self

    def __exit__(self, *_: object) -> None:
        for h in self.handles:
            h.stop()

    def step(self, i: int, admit: int = 0) -> tuple[StepDone, float, float]:
        """One step of worker `i` (admitting `admit` new requests): its StepDone, the send and receive times.
        A batch that ran out of tokens is replaced by a fresh one first (its prefill not timed)."""
        return self._step(i, self._admits([self.context] * admit, 2))

    def mixed(self, i: int, lengths: Sequence[int]) -> float:
        """One step of worker `i` decoding its batch (as `step`) and prefilling prompts of `lengths`
        that finish in it, so the batch stays as it was; the step's seconds. Raises unless vLLM ran
        them all in that one step (the worker's anomalies: a prompt chunked or left waiting)."""
        done, *_ = self._step(i, self._admits(lengths, 1))
        if done.anomalies:
            raise RuntimeError(f"worker {i}: not one mixed step: {'; '.join(done.anomalies)}")
        return done.t_end - done.t_start

    def decode_one(self, i: int) -> float:
        """One decode step of worker `i` holding a single request of the batch's context, its batch
        drained first; the step's seconds (the request's prefill and finishing step not timed, as
        `step` times neither for a batch)."""
        self.drain(i)
        self._send(i, StepCmd(self._admits([self.context], 3)))
        done, *_ = self._send(i, StepCmd(()))
        self._send(i, StepCmd(()))
        return done.t_end - done.t_start

    def drain(self, i: int) -> None:
        """Let worker `i`'s batch finish (its next `step` admits a fresh one of `batch`)."""
        while self._left[i] > 0:
            self._left[i] -= 1
            self._send(i, StepCmd(()))

    def prefill(self, i: int, lengths: Sequence[int]) -> float:
        """One step of worker `i`, its batch drained first, prefilling prompts of `lengths` that
        finish in that step; the step's seconds."""
        self.drain(i)
        done, *_ = self._send(i, StepCmd(self._admits(lengths, 1)))
        return done.t_end - done.t_start

    def _admits(self, lengths: Sequence[int], max_new: int) -> tuple[Admit, ...]:
        """New requests with prompts of `lengths`, each to generate `max_new` tokens."""
        first = self._next_id + 1
        self._next_id += len(lengths)
        return tuple(Admit(first + k, n, n, max_new) for k, n in enumerate(lengths))

    def _step(self, i: int, admits: tuple[Admit, ...]) -> tuple[StepDone, float, float]:
        if self._left[i] <= 1:
            self._refill(i)
        self._left[i] -= 1
        return self._send(i, StepCmd(admits))

    def _refill(self, i: int) -> None:
        self.drain(i)
        self._send(i, StepCmd(self._admits([self.context] * self.batch, self.budget)))
        self._left[i] = self.budget - 1

    def _send(self, i: int, cmd: StepCmd) -> tuple[StepDone, float, float]:
        h = self.handles[i]
        t_send = time.monotonic()
        h.send(cmd)
        done: StepDone = h.recv(60)
        return done, t_send, time.monotonic()


class SplitPair:
    """Pair's counterpart for split mode (`hwloop.split_runner`): two LLMs of one model, each a prefill
    and a decode worker (`hwloop.split_worker`), all four pinned to the same cores and mapping one KV
    pool; each decode worker holds a batch. A launch that admits requests is a prefill here, as in
    the split runner. The blocks hold zeros rather than prefilled KV: a step's time does not depend
    on the values."""

    def __init__(self, spec: ModelSpec, cores: Sequence[int], work: Path, batch: int, context: int,
                 budget: int, env: dict[str, str] | None = None) -> None:
        self.prefill_tokens = 2048
        self.pad_tokens = PAD_TOKENS  # the torch engine pads a prefill's tokens (`hwloop.kv_pool.PAD_TOKENS`)
        self.max_context = spec.max_context
        self.spec, self.cores, self.batch, self.context, self.budget = spec, tuple(cores), batch, context, budget
        self.chunk_blocks = blocks_per_chunk(spec)
        largest = 2 * max(batch, BESIDE_LOAD_BATCH, *BESIDE_BATCHES) * self._blocks(context + budget)
        self.pool = KVPool(largest + self._blocks(self.prefill_tokens) + self.chunk_blocks * 64)
        self.blocks = BlockAllocator(self.pool.num_blocks)
        worker_env = {**cpu_env(self.cores), **(env or {})}
        self.handles = {
            (i, phase): SplitWorkerHandle(SplitWorkerSpec(f"terms-{i}/{phase}", f"terms-{i}", phase, spec,  # type: ignore[arg-type]
                                                          self.pool.handle(), dtype=DTYPE_OF_BYTES[spec.dtype_bytes],
                                                          cores=self.cores, env=worker_env),
                                          work / "logs" / f"terms-{i}-{phase}.log")
            for i in range(2) for phase in ("prefill", "decode")}
        self._next_id = 0
        self._batches: list[list[DecodeItem]] = [[], []]  # each decode worker's batch, as its next step reads it

    def _blocks(self, tokens: int) -> int:
        return blocks_for_tokens(tokens, self.chunk_blocks)

    def __enter__(self) -> SplitPair:
        start_workers(list(self.handles.values()), timeout_s=600)
        return self

    def __exit__(self, *_: object) -> None:
        for h in self.handles.values():
            h.stop()
        self.pool.close()

    def step(self, i: int, admit: int = 0) -> tuple[PhaseDone, float, float]:
        """One decode step of worker `i`'s batch (a fresh batch once it ran out of tokens), or with
        `admit`, a prefill launch of that many prompts of the batch's context."""
        if admit:
            return self._prefill(i, [self.context] * admit)
        if not self._batches[i] or self._batches[i][0].remaining <= 1:
            self.drain(i)
            self._batches[i] = [DecodeItem(self._new_id(), FIRST_TOKEN_ID, self.context,
                                           tuple(self.blocks.allocate(self._blocks(self.context + self.budget))),
                                           self.budget) for _ in range(self.batch)]
        done, t_send, t_recv = self._send(self.handles[i, "decode"], DecodeCmd(tuple(self._batches[i])))
        self._batches[i] = [replace(it, token=done.new_tokens[it.request_id][-1], held=it.held + 1,
                                    remaining=it.remaining - 1) for it in self._batches[i]]
        return done, t_send, t_recv

    def drain(self, i: int) -> None:
        """Drop worker `i`'s batch (its next `step` decodes a fresh one of `batch`)."""
        for it in self._batches[i]:
            self.blocks.deallocate(it.blocks)
        self._batches[i] = []

    def prefill(self, i: int, lengths: Sequence[int]) -> float:
        """One prefill by LLM `i`'s prefill worker of prompts of `lengths`; the step's seconds."""
        done, *_ = self._prefill(i, lengths)
        return done.t_end - done.t_start

    def _prefill(self, i: int, lengths: Sequence[int]) -> tuple[PhaseDone, float, float]:
        items = tuple(PrefillItem(rid, tuple(synthetic_prompt(rid, n, self.spec.vocab_size)),
                                  tuple(self.blocks.allocate(self._blocks(n))))
                      for rid, n in ((self._new_id(), n) for n in lengths))
        try:
            return self._send(self.handles[i, "prefill"], PrefillCmd(items))
        finally:
            for it in items:
                self.blocks.deallocate(it.blocks)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    @staticmethod
    def _send(h: SplitWorkerHandle, cmd: PrefillCmd | DecodeCmd) -> tuple[PhaseDone, float, float]:
        t_send = time.monotonic()
        h.send(cmd)
        done: PhaseDone = h.recv(60)
        return done, t_send, time.monotonic()


Workers = Pair | SplitPair  # what the measurements below drive


def _ms(values: Sequence[float]) -> float:
    return 1e3 * float(np.median(values))


def _step_s(pair: Workers, i: int) -> float:
    done, *_ = pair.step(i)
    return done.t_end - done.t_start


def measure_turns(pair: Workers, steps: int) -> dict[str, float]:
    """Paired samples, so that load from other processes, which drifts, hits both alike: worker 0
    steps twice (the second step follows its own: alone), then worker 1 once and worker 0 once (that
    step follows worker 1's: in turns). The extra is the median of the pairs' differences."""
    alone, turns = [], []
    for _ in range(steps):
        _step_s(pair, 0)
        alone.append(_step_s(pair, 0))
        _step_s(pair, 1)
        turns.append(_step_s(pair, 0))
    diff = np.subtract(turns, alone)
    return {"alone_ms": _ms(alone), "in_turns_ms": _ms(turns), "extra_ms": _ms(diff),
            "extra_iqr_ms": 1e3 * float(np.subtract(*np.percentile(diff, [75, 25]))), "steps": steps}


def measure_idle(pair: Workers, steps: int, gaps_s: Sequence[float] = IDLE_GAPS_S) -> dict[str, Any]:
    """Paired samples per gap: a step right after the engine's previous one (back to back), then a
    step after sleeping `gap`; the extra is the median of the pairs' differences."""
    rows = []
    for gap in gaps_s:
        back_to_back, after = [], []
        for _ in range(steps):
            _step_s(pair, 0)
            back_to_back.append(_step_s(pair, 0))
            time.sleep(gap)
            after.append(_step_s(pair, 0))
        diff = np.subtract(after, back_to_back)
        rows.append({"gap_s": gap, "back_to_back_ms": _ms(back_to_back), "after_ms": _ms(after),
                     "extra_ms": _ms(diff), "extra_iqr_ms": 1e3 * float(np.subtract(*np.percentile(diff, [75, 25])))})
    return {"gaps": rows, "steps": steps}


def measure_dispatch(pair: Workers, steps: int) -> dict[str, float]:
    """Median send-to-step-start and step-end-to-reply of decode launches (`decode_ms`: their sum),
    and the excess send-to-step-start of launches admitting one request (`admit_ms`)."""
    send, reply, admitting = [], [], []
    for _ in range(steps):
        done, t_send, t_recv = pair.step(0)
        send.append(done.t_start - t_send)
        reply.append(t_recv - done.t_end)
        done, t_send, _ = pair.step(0, admit=1)
        admitting.append(done.t_start - t_send)
    return {"send_ms": _ms(send), "reply_ms": _ms(reply), "decode_ms": _ms(send) + _ms(reply),
            "admit_ms": _ms(admitting) - _ms(send), "steps": steps}


def measure_shapes(pair: Workers, steps: int, near: Sequence[int] = SHAPE_TOKENS) -> dict[str, Any]:
    """Paired samples per token count: a prefill of a count the engine never ran, then the same
    prompts again (now cached); the extra is the median of the pairs' differences. Each sample uses
    its own count above `near`, one padding step (`pad_tokens`) apart, so every first step really is
    the engine's first at the shape it runs."""
    rows = []
    longest = pair.max_context - 2
    pad = pair.pad_tokens
    for target in sorted({min(t, pair.prefill_tokens - steps * pad) for t in near}):
        novel, cached = [], []
        for k in range(steps):
            lengths = prompt_lengths(target + k * pad, longest)
            novel.append(pair.prefill(0, lengths))
            cached.append(pair.prefill(0, lengths))
        diff = np.subtract(novel, cached)
        rows.append({"tokens": target, "novel_ms": _ms(novel), "cached_ms": _ms(cached), "extra_ms": _ms(diff),
                     "extra_iqr_ms": 1e3 * float(np.subtract(*np.percentile(diff, [75, 25])))})
    return {"counts": rows, "steps": steps, "pad_tokens": pad}


class Neighbour:
    """A second engine decoding non-stop on other cores, in a thread, while `on`."""

    def __init__(self, pair: Workers) -> None:
        self.pair, self.on, self._stop = pair, threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)

    def _work(self) -> None:
        while not self._stop.is_set():
            if self.on.wait(0.01):
                self.pair.step(0)

    def __enter__(self) -> Neighbour:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_beside(pair: Workers, neighbour: Neighbour, steps: int, batches: Sequence[int] = BESIDE_BATCHES,
                   prompt_tokens: Sequence[int] = BESIDE_PROMPT_TOKENS) -> dict[str, Any]:
    """Per step size: `steps` steps alone, as many beside the busy neighbour, as many alone again;
    the factor is the median beside over the median of both alone stretches (which bracket it, so
    a slow drift of other load hits both)."""
    rows, batch = [], pair.batch
    sizes = [("decode", b) for b in batches] + [("prefill", n) for n in prompt_tokens]
    for kind, size in sizes:
        if kind == "decode":
            pair.batch = size
            pair.drain(0)
            step = lambda: _step_s(pair, 0)  # noqa: E731
        else:
            lengths = prompt_lengths(size, pair.max_context - 2)
            step = lambda lengths=lengths: pair.prefill(0, lengths)  # noqa: E731
        step()  # warm: this size's shapes built
        alone = [step() for _ in range(steps)]
        neighbour.on.set()
        time.sleep(0.05)
        beside = [step() for _ in range(steps)]
        neighbour.on.clear()
        time.sleep(0.05)
        alone += [step() for _ in range(steps)]
        rows.append({"kind": kind, "tokens": size, "alone_ms": _ms(alone), "beside_ms": _ms(beside),
                     "factor": float(np.median(beside) / np.median(alone))})
    pair.batch = batch
    pair.drain(0)
    return {"sizes": rows, "steps": steps, "neighbour_batch": neighbour.pair.batch}


MixedSample = tuple[float, float, float, float]  # seconds of a mixed step, its prefill, its decode, a decode of one


def _mixed_cycle(pair: Pair, prompt_tokens: Sequence[int]) -> dict[int, MixedSample]:
    """Per prompt length, a decode step of worker 0's batch (a fresh one) and right after it the
    same step admitting one prompt; then, the batch finished, each prompt prefilled alone and one
    request decoded alone. The pair's budget must last the cycle (2 steps per length, plus 2)."""
    decode, mixed = {}, {}
    for n in prompt_tokens:
        decode[n] = _step_s(pair, 0)
        mixed[n] = pair.mixed(0, [n])
    prefill = {n: pair.prefill(0, [n]) for n in prompt_tokens}
    one = pair.decode_one(0)
    return {n: (mixed[n], prefill[n], decode[n], one) for n in prompt_tokens}


@dataclass(frozen=True)
class _Parts:
    """One cycle's measured parts posing as a cost model, so that the check runs
    `policies.cost.mixed_step_time` itself, not a copy of its formula: a decode of the cycle's batch
    costs what the cycle measured for it, a decode of one request what it measured alone (for a
    batch of one, the former: the formula asks for the same cell twice)."""

    prefill_s: float
    decode_s: float
    one_s: float
    batch: int

    def prefill_time(self, *_: object) -> float:
        return self.prefill_s

    def decode_time(self, model: object, tp: int, sm_pct: int, batch: int, ctx_len: float) -> float:
        return self.decode_s if batch == self.batch else self.one_s


def _mixed_row(batch: int, tokens: int, samples: Sequence[MixedSample], context: int) -> dict[str, float]:
    """The parts' medians, and the medians of each cycle's ratios (its parts timed within a
    fraction of a second of its mixed step, so under nearly the same load)."""
    mixed, prefill, decode, one = (np.array(x) for x in zip(*samples, strict=True))
    formula = np.array([mixed_step_time(_Parts(p, d, o, batch), None, 1, 100, 1, tokens, batch, context)  # type: ignore[arg-type]
                        for p, d, o in zip(prefill, decode, one, strict=True)])
    return {"batch": batch, "prompt_tokens": tokens, "mixed_ms": _ms(mixed), "prefill_ms": _ms(prefill),
            "decode_ms": _ms(decode), "decode1_ms": _ms(one), "sum_over_mixed": float(np.median((prefill + decode) / mixed)),
            "formula_over_mixed": float(np.median(formula / mixed))}


def measure_mixed(pair: Pair, cycles: int, batches: Sequence[int] = MIXED_BATCHES,
                  prompt_tokens: Sequence[int] = MIXED_PROMPT_TOKENS, warmup: int = MIXED_WARMUP) -> dict[str, Any]:
    """Per decode batch, `warmup` cycles untimed (every token count a cycle runs then has its kernels
    built), then `cycles` timed ones; a row per batch and prompt length (`_mixed_row`)."""
    rows, batch, budget = [], pair.batch, pair.budget
    pair.budget = 2 * len(prompt_tokens) + 2
    for b in batches:
        pair.batch = b
        for _ in range(warmup):
            _mixed_cycle(pair, prompt_tokens)
        samples = [_mixed_cycle(pair, prompt_tokens) for _ in range(cycles)]
        rows += [_mixed_row(b, n, [s[n] for s in samples], pair.context) for n in prompt_tokens]
    pair.batch, pair.budget = batch, budget
    return {"rows": rows, "cycles": cycles, "warmup": warmup, "context": pair.context}


def mixed_table(mixed: dict[str, Any]) -> str:
    """`measure_mixed`'s rows, to read."""
    head = ("batch", "prompt", "mixed ms", "prefill ms", "decode ms", "decode1 ms", "sum/mixed", "formula/mixed")
    keys = ("mixed_ms", "prefill_ms", "decode_ms", "decode1_ms", "sum_over_mixed", "formula_over_mixed")
    lines = ["  ".join(f"{h:>{len(h)}}" for h in head)]
    for r in mixed["rows"]:
        cells = [r["batch"], r["prompt_tokens"], *(f"{r[k]:.2f}" for k in keys)]
        lines.append("  ".join(f"{c:>{len(h)}}" for c, h in zip(cells, head, strict=True)))
    return "\n".join(lines)


def measure_mixed_step(spec: ModelSpec, cores: Sequence[int], work: Path, cycles: int,
                       context: int = 64) -> dict[str, Any]:
    """`measure_mixed` on one mixed-mode worker of `spec` on `cores`, with how it was measured."""
    out: dict[str, Any] = {"model": spec.name, "cores": len(tuple(cores)), "context": context, "workers": "mixed",
                           "loadavg_before": os.getloadavg()[0]}
    with Pair(spec, cores, work, MIXED_BATCHES[0], context, budget=0, workers=1) as pair:  # measure_mixed sets the budget
        out["mixed"] = measure_mixed(pair, cycles)
    out["loadavg_after"] = os.getloadavg()[0]
    return out


def measure(spec: ModelSpec, cores: Sequence[int], work: Path, which: Sequence[str] = TERMS, steps: int = 60,
            batch: int = 4, context: int = 64, others: Sequence[int] = (), split: bool = False) -> dict[str, Any]:
    """The chosen terms for `spec` on `cores`, with how they were measured, on the mixed-mode worker
    or with `split` on the split-mode workers; `beside` needs `others` (cores for the neighbouring
    engine) and is None without them."""
    budget = min(4 * steps, spec.max_context - context - 2)
    out: dict[str, Any] = {"model": spec.name, "cores": len(tuple(cores)), "batch": batch, "context": context,
                           "workers": "split" if split else "mixed", "loadavg_before": os.getloadavg()[0]}
    pair_type = SplitPair if split else Pair
    with pair_type(spec, cores, work, batch, context, budget) as pair:
        pair.step(0), pair.step(1)  # both batches admitted and warm
        for term in which:
            if term == "beside":
                out[term] = None  # no cores outside `cores`: no engine can work beside it
                if others:
                    with pair_type(spec, others, work / "beside", BESIDE_LOAD_BATCH, context, budget) as other, \
                            Neighbour(other) as neighbour:
                        out[term] = measure_beside(pair, neighbour, steps // 3)
                continue
            how = {"turns": measure_turns, "idle": measure_idle, "dispatch": measure_dispatch,
                   "shapes": measure_shapes}[term]
            out[term] = how(pair, steps // 2 if term == "idle" else steps // 3 if term == "shapes" else steps)
    out["loadavg_after"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("term", choices=[*TERMS, "all", "mixed"])
    ap.add_argument("--cores", type=int, nargs="*", help="cores both engines are pinned to (default: all)")
    ap.add_argument("--beside-cores", type=int, nargs="*",
                    help="cores of the neighbouring engine for `beside` (default: the others this process may use)")
    ap.add_argument("--steps", type=int, default=60, help="samples per term (`mixed`: cycles = steps // 3)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--split", action="store_true", help="on the split-mode workers (default: the mixed-mode vLLM one)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.term == "mixed" and args.split:
        ap.error("mixed: the split-mode workers never run a step that prefills and decodes at once")
    spec = ModelSpec("tiny-l4-h512", 4, 512, 8, 8, 1376, 1024, max_context=512)
    cores = tuple(args.cores or available_cores())
    others = tuple(args.beside_cores if args.beside_cores is not None else
                   (c for c in available_cores() if c not in cores))
    with tempfile.TemporaryDirectory(prefix="muxsim-terms-") as tmp:
        if args.term == "mixed":
            result = measure_mixed_step(spec, cores, Path(tmp), args.steps // 3)
        else:
            result = measure(spec, cores, Path(tmp), TERMS if args.term == "all" else (args.term,), args.steps,
                             args.batch, others=others, split=args.split)
    print(mixed_table(result["mixed"]) if args.term == "mixed" else json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
