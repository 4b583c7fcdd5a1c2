"""One hardware run's jobs replayed on fresh workers, one condition of the run at a time.

    python -m experiments.job_replay RUN_FOLDER --level 3 --repeat 0
    python -m experiments.job_replay RUN_FOLDER --level 3 --conditions back-to-back as-run

`experiments.job_report` reads a run's jobs against the profile; where the hardware's jobs take
longer than the profile plus what the simulator's runner terms (`hwloop.terms`) charge, it cannot
say which of the run's conditions costs the difference. This replays the jobs of one hardware run
of an `experiments.validate` folder, the same launches in the same order, on new workers pinned to
the cores the run gave them, under each condition:

- `back-to-back`: each job sent when the one before it ended, one worker at a time: the served
  shapes and their order only;
- `as-run`: each job sent at its logged start, every worker at once: also the idle gaps, the LLMs
  taking turns on shared cores and the engines working beside each other;
- `with-decodes` (split mode): as-run, and the run's decode jobs replayed at their logged starts on
  decode workers on the run's decode cores.

A split-mode run replays its prefill jobs (its decode jobs only beside them, in `with-decodes`). A
mixed-mode run (vLLM) replays every job of each LLM's engine: the requests each job admitted are
rebuilt from the run's records (those whose first token its first step produced), each with its
prompt and output length, so every engine holds the same requests at every step as in the run and
each job runs the same mixed steps; a run with preempted requests cannot be rebuilt so (their
recomputes are in no record) and is refused.

Every replayed job is read against the profile (`measured`, send to the end of its last step as the
runner logs it) and against what the simulator charges that job under the conditions it was
replayed in (`charged`: `policies.cost.profiled_job_time` times the beside factor, plus the
first-step extras of `policies.cost.RunnerTerms`, from the replay's own timeline as `sim.engine`
derives them); the run itself is charged the same way from its logged timeline. A condition whose
measured exceeds its charged holds a cost that no term charges. The profile and terms are the run's
own (its `profiles/` copies); the replay runs on this machine now, so compare conditions within one
replay, and against the run's own figures (printed beside) only as a check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.config import ConfigError
from experiments.job_report import job_ratios, run_config, run_table
from experiments.systems import SYSTEMS
from experiments.validate import build_setup, plan, terms_path
from hwloop.engine import synthetic_prompt
from hwloop.kv_pool import BlockAllocator, KVPool
from hwloop.partition import cpu_env
from hwloop.process import WorkerProcess, start_workers
from hwloop.runner import placed_engine
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
from policies.batching import make_batching
from policies.cost import FirstSteps, RunnerTerms
from policies.placement import Placement, blocks_for_tokens, blocks_per_chunk
from policies.specs import ModelSpec
from traces.schema import Workload

CONDITIONS = ("back-to-back", "as-run", "with-decodes")
MODE_CONDITIONS = {"split": CONDITIONS, "mixed": ("back-to-back", "as-run")}


@dataclass
class Logged:
    """What one hardware run logged, and what its replays need."""

    mode: str  # "split" or "mixed"
    # The jobs replayed, in start order, with `worker` (the process that ran each: "<llm>/prefill" in
    # split mode, "<llm>" in mixed mode) and `profiled_s`; split: the prefill jobs, with `lengths`
    # (each prompt's tokens); mixed: every job, with `admits` (the `Admit`s of the requests it admitted).
    jobs: pd.DataFrame
    decodes: pd.DataFrame  # split: its decode jobs in start order, with `worker` (replayed beside, `with-decodes`); mixed: none
    specs: dict[str, ModelSpec]  # by model name
    cores: dict[str, tuple[int, ...]]  # by worker: "<llm>/<phase>" (split) or "<llm>" (mixed)
    placement: Placement
    max_prefill_tokens: int  # the batching policy's token budget (a mixed engine is sized by it)
    terms: RunnerTerms

    @property
    def pool_blocks(self) -> int:
        return self.placement.units[0].kv_blocks


def logged_run(run: Path, level: int, repeat: int) -> Logged:
    config = run_config(run)
    mode = str(config.get("mode", "mixed"))
    if config.get("device", "cpu") != "cpu":
        raise ConfigError(f"{run}: a device={config.get('device')} run; job_replay replays on this machine's "
                          "CPU cores, as the run's core slices say (CPU runs only)")
    jobs = job_ratios(run)
    hw = jobs[(jobs["executor"] == "hw") & (jobs["level"] == level) & (jobs["repeat"] == repeat)]
    if hw.empty:
        have = sorted({(int(x.level), int(x.repeat)) for x in jobs[jobs["executor"] == "hw"].itertuples()})
        raise ConfigError(f"{run}: no hardware run at level {level}, repeat {repeat} (there are: "
                          f"{', '.join(f'level {a} repeat {b}' for a, b in have)})")
    system = str(hw["system"].iloc[0])
    s = build_setup(config)
    tag = f"{system}_L{level}"
    planned = plan(system, s, run_table(run), Workload.read(run / f"workload_{tag}.parquet"))
    records = pd.read_parquet(run / f"records_{tag}_hw{repeat}.parquet")
    hw = hw.sort_values("start_s", kind="stable").reset_index(drop=True)
    if mode == "split":
        replayed = hw[hw["phase"] == "prefill"].reset_index(drop=True)
        prompts = records.groupby(["model", "first_token_s"])["prompt_tokens"].apply(tuple).to_dict()
        replayed["lengths"] = [_lengths(prompts.get((j.llm, j.first_end_s)), j.admitted, j.admitted_context)
                               for j in replayed.itertuples()]
        replayed["worker"] = replayed["llm"] + "/prefill"
        decodes = hw[hw["phase"] == "decode"].reset_index(drop=True)
        decodes["worker"] = decodes["llm"] + "/decode"
    else:
        replayed = hw.assign(admits=_admits(hw, records, f"{run}: level {level}, repeat {repeat}"), worker=hw["llm"])
        decodes = hw.iloc[:0]
    measured = [m for p in sorted((run / "profiles").glob("*.parquet")) if terms_path(p).exists()
                for m in json.loads(terms_path(p).read_text())]
    assert planned.slices is not None  # a CPU run
    batching = make_batching(SYSTEMS[system][1], **planned.common["batching_opts"])
    return Logged(mode, replayed, decodes, {spec.name: spec for spec in s.specs.values()}, planned.slices,
                  planned.placement, batching.max_prefill_tokens, RunnerTerms.from_measured(measured, "the run's"))


def _lengths(prompts: tuple[int, ...] | None, admitted: int, context: int) -> tuple[int, ...]:
    """The job's prompt lengths from the records (the requests whose first token it produced); split
    evenly when they do not add up to its context (a preempted request's recompute holds its output)."""
    if prompts is not None and len(prompts) == admitted and sum(prompts) == context:
        return prompts
    return tuple(context // admitted + (k < context % admitted) for k in range(admitted))


def _admits(jobs: pd.DataFrame, records: pd.DataFrame, where: str) -> list[tuple[Admit, ...]]:
    """Each mixed job's admitted requests, as the runner sent them: the records whose first token
    its first step produced (same LLM, first-token time its first step's end), whole prompt and
    output each. Refused, in one line, where a job's admissions are not all in the records."""
    preempted = int(records["preemptions"].sum())
    if preempted:
        raise ConfigError(f"{where}: {preempted} preemption(s); a preempted request's recompute is in no record, "
                          f"so this run's launches cannot be rebuilt (replay a run without preemptions)")
    by_first = {key: list(g.itertuples()) for key, g in records.groupby(["model", "first_token_s"])}
    out = []
    for j in jobs.itertuples():
        got = by_first.get((j.llm, j.first_end_s), []) if j.admitted else []
        if len(got) != j.admitted or sum(r.prompt_tokens for r in got) != j.admitted_context:
            raise ConfigError(f"{where}: the job of {j.llm} at {j.start_s:.3f} s admitted {j.admitted} request(s) of "
                              f"{j.admitted_context} tokens; the records name {len(got)} with that first token")
        out.append(tuple(Admit(int(r.request_id), int(r.prompt_tokens), int(r.prompt_tokens), int(r.output_tokens))
                         for r in got))
    return out


def replay(logged: Logged, condition: str) -> pd.DataFrame:
    """The jobs under `condition`: the logged columns plus `sent_s`, `started_s` (the worker's first
    step) and `ended_s`, from the replay's start; `measured_s` (send to end), `charged_s`."""
    if condition not in MODE_CONDITIONS[logged.mode]:
        raise ConfigError(f"condition {condition!r}: a {logged.mode}-mode run replays under "
                          f"{', '.join(MODE_CONDITIONS[logged.mode])}")
    with tempfile.TemporaryDirectory(prefix="muxsim-replay-") as tmp:
        timeline, busy = (_replay_split if logged.mode == "split" else _replay_mixed)(logged, condition, Path(tmp))
    out = logged.jobs.assign(sent_s=[a for a, _, _ in timeline], started_s=[b for _, b, _ in timeline],
                             ended_s=[c for _, _, c in timeline])
    out["measured_s"] = out["ended_s"] - out["sent_s"]
    if logged.mode == "mixed" and condition == "as-run":
        busy = [(j.sent_s, j.ended_s, logged.cores[j.worker]) for j in out.itertuples()]
    out["charged_s"] = charges(out, logged, busy, "sent_s", "ended_s")
    out.attrs["decode_spans"] = busy if logged.mode == "split" else []
    return out


Timeline = list[tuple[float, float, float]]  # per job: sent, first step started, ended (s from the replay's start)
Spans = list[tuple[float, float, tuple[int, ...]]]  # jobs working beside: start, end, cores


def _replay_split(logged: Logged, condition: str, tmp: Path) -> tuple[Timeline, Spans]:
    pool = KVPool(logged.pool_blocks)
    blocks, lock = BlockAllocator(pool.num_blocks), threading.Lock()
    phases = ("prefill", "decode") if condition == "with-decodes" else ("prefill",)
    llms = sorted(set(logged.jobs["llm"]) | (set(logged.decodes["llm"]) if "decode" in phases else set()))
    model_of = dict(zip(logged.jobs["llm"], logged.jobs["model"], strict=False)) | \
        dict(zip(logged.decodes["llm"], logged.decodes["model"], strict=False))
    handles = {}
    for llm in llms:
        spec = logged.specs[model_of[llm]]
        for phase in phases:
            cores = logged.cores[f"{llm}/{phase}"]
            handles[llm, phase] = SplitWorkerHandle(
                SplitWorkerSpec(f"{llm}/{phase}", llm, phase, spec, pool.handle(),  # type: ignore[arg-type]
                                dtype=DTYPE_OF_BYTES[spec.dtype_bytes], cores=cores, env=cpu_env(cores)),
                tmp / f"{llm}-{phase}.log")
    try:
        start_workers(list(handles.values()), timeout_s=600)
        t0 = time.monotonic()
        decodes = _DecodeReplay(logged, handles, blocks, lock, t0) if "decode" in phases else None
        timeline = []
        for k, job in enumerate(logged.jobs.itertuples()):
            spec = logged.specs[job.model]
            with lock:
                items = tuple(PrefillItem(k * 1000 + i, tuple(synthetic_prompt(k * 1000 + i, n, spec.vocab_size)),
                                          tuple(blocks.allocate(blocks_for_tokens(n, blocks_per_chunk(spec)))))
                              for i, n in enumerate(job.lengths))
            if condition != "back-to-back":
                time.sleep(max(0.0, job.start_s - (time.monotonic() - t0)))
            done, sent = _send(handles[job.llm, "prefill"], PrefillCmd(items))
            timeline.append((sent - t0, done.t_start - t0, done.t_end - t0))
            with lock:
                for it in items:
                    blocks.deallocate(it.blocks)
        if decodes is not None:
            decodes.join()
    finally:
        for h in handles.values():
            h.stop()
        pool.close()
    return timeline, decodes.spans if decodes is not None else []


def _replay_mixed(logged: Logged, condition: str, tmp: Path) -> tuple[Timeline, Spans]:
    """Each LLM's jobs on a fresh vLLM worker built as the run built it (`hwloop.runner.placed_engine`).
    Back to back: one worker at a time. As run: one thread per group of workers sharing cores, each
    sending its group's jobs in logged order, none before its logged start."""
    handles: dict[str, WorkerProcess] = {}
    for unit in logged.placement.units:
        for x in unit.llms:
            cores = logged.cores[x.name]
            engine = placed_engine(x, unit, logged.specs[x.model], logged.max_prefill_tokens, tmp / "models")
            handles[x.name] = WorkerHandle(WorkerSpec(x.name, engine, cores, cpu_env(cores)), tmp / f"{x.name}.log")
    jobs = logged.jobs
    groups = (list(jobs.groupby("worker", sort=True).groups.values()) if condition == "back-to-back"
              else _core_groups(jobs, logged.cores))
    timeline: Timeline = [(np.nan, np.nan, np.nan)] * len(jobs)
    diverged: list[str] = []
    try:
        start_workers(list(handles.values()), timeout_s=900)
        t0 = time.monotonic()

        def run_group(rows: Sequence[int]) -> None:
            for k in rows:
                job = jobs.iloc[k]
                if condition == "as-run":
                    time.sleep(max(0.0, job.start_s - (time.monotonic() - t0)))
                done, sent = _send(handles[job.worker], StepCmd(job.admits, max_steps=int(job.steps)))
                timeline[k] = (sent - t0, done.t_start - t0, done.t_end - t0)
                if done.steps != job.steps or len(done.tokens) != job.admitted + job.decoding:
                    diverged.append(f"the job of {job.llm} at {job.start_s:.3f} s ran {done.steps} step(s) of "
                                    f"{len(done.tokens)} request(s), logged {job.steps} of {job.admitted + job.decoding}")

        if condition == "back-to-back":
            for rows in groups:
                run_group(list(rows))
        else:
            threads = [threading.Thread(target=run_group, args=(list(rows),), daemon=True) for rows in groups]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        for h in handles.values():
            h.stop()
    if diverged:
        raise ConfigError(f"the replay did not run the logged jobs ({len(diverged)} differ): {diverged[0]}")
    return timeline, []


def _core_groups(jobs: pd.DataFrame, cores: dict[str, tuple[int, ...]]) -> list[list[int]]:
    """The jobs' row numbers, one list per group of workers whose cores overlap (they take turns),
    in logged start order."""
    groups: list[tuple[set[int], set[str]]] = []
    for worker in sorted(set(jobs["worker"])):
        mine = set(cores[worker])
        joined = [g for g in groups if g[0] & mine]
        merged = (mine.union(*(g[0] for g in joined)), {worker}.union(*(g[1] for g in joined)))
        groups = [g for g in groups if g not in joined] + [merged]
    return [list(np.flatnonzero(jobs["worker"].isin(workers))) for _, workers in groups]


class _DecodeReplay:
    """The run's decode jobs, each at its logged start on its LLM's decode worker, in a thread: the
    same batch sizes, contexts and step counts (the blocks' contents are whatever the pool holds)."""

    def __init__(self, logged: Logged, handles: dict, blocks: BlockAllocator, lock: threading.Lock, t0: float) -> None:
        self.logged, self.handles, self.blocks, self.lock, self.t0 = logged, handles, blocks, lock, t0
        self.spans: Spans = []  # (start, end, cores) from the replay's start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for job in self.logged.decodes.itertuples():
            spec = self.logged.specs[job.model]
            context = max(1, job.decoding_context // max(1, job.decoding))
            with self.lock:
                items = tuple(DecodeItem(-1 - i, 1, context, tuple(self.blocks.allocate(
                    blocks_for_tokens(context + job.steps + 1, blocks_per_chunk(spec)))), job.steps)
                    for i in range(job.decoding))
            time.sleep(max(0.0, job.start_s - (time.monotonic() - self.t0)))
            done, sent = _send(self.handles[job.llm, "decode"], DecodeCmd(items, max_steps=job.steps))
            self.spans.append((sent - self.t0, done.t_end - self.t0, self.logged.cores[f"{job.llm}/decode"]))
            with self.lock:
                for it in items:
                    self.blocks.deallocate(it.blocks)

    def join(self) -> None:
        self._thread.join()


def _send(handle: WorkerProcess, cmd: PrefillCmd | DecodeCmd | StepCmd) -> tuple[PhaseDone | StepDone, float]:
    sent = time.monotonic()
    handle.send(cmd)
    return handle.recv(120), sent


def charges(jobs: pd.DataFrame, logged: Logged, busy: Spans, sent: str, ended: str) -> np.ndarray:
    """What the simulator charges each job under the conditions it ran in, from a timeline (columns
    `sent` and `ended`), as `sim.engine.Simulator._runner_extra` derives them: the profile, times the
    beside factor when a job on other cores ran at its send, plus the extras of its first step
    (dispatch and admission, a token count its worker never ran, how long its cores sat idle and
    whether another worker ran there last; `policies.cost.FirstSteps`, as the simulator)."""
    first_steps = FirstSteps(logged.terms)
    charged = []
    for job in jobs.sort_values(sent, kind="stable").itertuples():
        cores = logged.cores[job.worker]
        tokens = int(job.admitted_context + job.decoding)  # `policies.ledger.Batch.step_tokens`
        at = getattr(job, sent)
        extra, _ = first_steps.start(job.worker, cores, at, job.model, tokens, admitting=job.admitted > 0)
        beside = any(a <= at < b and set(cores).isdisjoint(c) for a, b, c in busy)
        factor = logged.terms.beside_factor(job.model, len(cores), tokens) if beside else 1.0
        charged.append((job.Index, job.profiled_s * factor + extra))
        first_steps.end(cores, getattr(job, ended))
    return pd.Series(dict(charged)).reindex(jobs.index).to_numpy()


def summary(replays: dict[str, pd.DataFrame], logged: Logged) -> pd.DataFrame:
    """Per condition (and the run itself, charged from its logged timeline): summed time over the
    summed profile, measured and charged, and the median of measured over charged, for jobs that
    admit prompts and (mixed mode) pure decodes, all and split by whether their worker had run the
    job's token count before (`seen`)."""
    every = pd.concat([logged.jobs, logged.decodes], ignore_index=True)  # every job the run logged, on its cores
    logged_busy = [(j.start_s, j.end_s, logged.cores[j.worker]) for j in every.itertuples()]
    run = logged.jobs.assign(measured_s=logged.jobs["took_s"],
                             charged_s=charges(logged.jobs, logged, logged_busy, "start_s", "end_s"))
    rows = []
    for name, jobs in {"the run (logged)": run, **replays}.items():
        kinds = jobs.groupby(np.where(jobs["admitted"] > 0, "admitting", "decoding"))
        for kind, of_kind in kinds:
            for seen, part in [("all", of_kind), *((f"seen={flag}", g) for flag, g in of_kind.groupby("seen"))]:
                rows.append({"condition": name, "jobs": kind, "seen": seen, "n": len(part),
                             "measured ÷ profile": part["measured_s"].sum() / part["profiled_s"].sum(),
                             "charged ÷ profile": part["charged_s"].sum(min_count=1) / part["profiled_s"].sum(),
                             "measured ÷ charged (median)": float((part["measured_s"] / part["charged_s"]).median())})
    return pd.DataFrame(rows).set_index(["condition", "jobs", "seen"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a folder `python -m experiments.validate` wrote")
    ap.add_argument("--level", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=0)
    ap.add_argument("--conditions", nargs="+", choices=CONDITIONS,
                    help="default: every condition of the run's mode")
    args = ap.parse_args()
    try:
        logged = logged_run(args.run, args.level, args.repeat)
        replays = {c: replay(logged, c) for c in args.conditions or MODE_CONDITIONS[logged.mode]}
    except ConfigError as e:
        sys.exit(f"ConfigError: {e}")
    print(f"{args.run}: level {args.level}, repeat {args.repeat}, {logged.mode} mode: {len(logged.jobs)} jobs "
          f"replayed, {len(logged.decodes)} decode jobs beside; terms {logged.terms.label}")
    with pd.option_context("display.width", 200):
        print(summary(replays, logged).round(3).to_string())


if __name__ == "__main__":
    main()
