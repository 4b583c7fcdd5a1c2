"""One hardware split run's prefill jobs replayed on fresh workers, one condition of the run at a time.

    python -m experiments.job_replay RUN_FOLDER --level 3 --repeat 0
    python -m experiments.job_replay RUN_FOLDER --level 3 --conditions back-to-back as-run

`experiments.job_report` reads a run's jobs against the profile; where the hardware's prefill jobs
take longer than the profile plus what the simulator's runner terms (`hwloop.terms`) charge, it
cannot say which of the run's conditions costs the difference. This replays the prefill jobs of one
hardware run of a split-mode `experiments.validate` folder, the same prompt lengths in the same
order, on new prefill workers pinned to the cores the run gave them, under each condition:

- `back-to-back`: each job sent when the one before it ended: the served shapes and their order only;
- `as-run`: each job sent at its logged start: also the idle gaps, and the LLMs taking turns on cores;
- `with-decodes`: as-run, and the run's decode jobs replayed at their logged starts on decode workers
  on the run's decode cores: also the engines working beside.

Every replayed job is read against the profile (`measured`, send to step end as the runner logs it)
and against what the simulator charges that job under the conditions it was replayed in
(`charged`: `policies.cost.profiled_job_time` times the beside factor, plus the first-step extras of
`policies.cost.RunnerTerms`, from the replay's own timeline as `sim.engine` derives them). A condition
whose measured exceeds its charged holds a cost that no term charges. The profile and terms are the
run's own (its `profiles/` copies); the replay runs on this machine now, so compare conditions
within one replay, and against the run's own figures (printed beside) only as a check.
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
from experiments.validate import build_setup, plan, terms_path
from hwloop.engine import synthetic_prompt
from hwloop.kv_pool import BlockAllocator, KVPool
from hwloop.partition import cpu_env
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
from policies.cost import FirstSteps, RunnerTerms
from policies.placement import blocks_for_tokens, blocks_per_chunk
from policies.specs import ModelSpec
from traces.schema import Workload

CONDITIONS = ("back-to-back", "as-run", "with-decodes")


@dataclass
class Logged:
    """What one hardware run logged, and what its replays need."""

    prefills: pd.DataFrame  # its prefill jobs in start order, with `lengths` (each prompt's tokens) and `profiled_s`
    decodes: pd.DataFrame  # its decode jobs in start order
    specs: dict[str, ModelSpec]  # by model name
    cores: dict[str, tuple[int, ...]]  # by worker, "<llm>/<phase>"
    pool_blocks: int
    terms: RunnerTerms


def logged_run(run: Path, level: int, repeat: int) -> Logged:
    config = run_config(run)
    if config.get("mode") != "split":
        raise ConfigError(f"{run}: a {config.get('mode')}-mode run; only split-mode runs replay (their workers "
                          f"take one phase's jobs each)")
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
    prompts = records.groupby(["model", "first_token_s"])["prompt_tokens"].apply(tuple).to_dict()
    prefills = hw[hw["phase"] == "prefill"].sort_values("start_s", kind="stable").copy()
    prefills["lengths"] = [_lengths(prompts.get((j.llm, j.first_end_s)), j.admitted, j.admitted_context)
                           for j in prefills.itertuples()]
    measured = [m for p in sorted((run / "profiles").glob("*.parquet")) if terms_path(p).exists()
                for m in json.loads(terms_path(p).read_text())]
    return Logged(prefills.reset_index(drop=True),
                  hw[hw["phase"] == "decode"].sort_values("start_s", kind="stable").reset_index(drop=True),
                  {spec.name: spec for spec in s.specs.values()}, planned.slices,
                  planned.placement.units[0].kv_blocks, RunnerTerms.from_measured(measured, "the run's"))


def _lengths(prompts: tuple[int, ...] | None, admitted: int, context: int) -> tuple[int, ...]:
    """The job's prompt lengths from the records (the requests whose first token it produced); split
    evenly when they do not add up to its context (a preempted request's recompute holds its output)."""
    if prompts is not None and len(prompts) == admitted and sum(prompts) == context:
        return prompts
    return tuple(context // admitted + (k < context % admitted) for k in range(admitted))


def replay(logged: Logged, condition: str) -> pd.DataFrame:
    """The prefill jobs under `condition`: the logged columns plus `sent_s`, `started_s` (the worker's
    step) and `ended_s`, from the replay's start; `measured_s` (send to end), `charged_s`."""
    if condition not in CONDITIONS:
        raise ConfigError(f"condition {condition!r}: must be one of {', '.join(CONDITIONS)}")
    pool = KVPool(logged.pool_blocks)
    blocks, lock = BlockAllocator(pool.num_blocks), threading.Lock()
    phases = ("prefill", "decode") if condition == "with-decodes" else ("prefill",)
    llms = sorted(set(logged.prefills["llm"]) | (set(logged.decodes["llm"]) if "decode" in phases else set()))
    model_of = dict(zip(logged.prefills["llm"], logged.prefills["model"], strict=False)) | \
        dict(zip(logged.decodes["llm"], logged.decodes["model"], strict=False))
    with tempfile.TemporaryDirectory(prefix="muxsim-replay-") as tmp:
        handles = {}
        for llm in llms:
            spec = logged.specs[model_of[llm]]
            for phase in phases:
                cores = logged.cores[f"{llm}/{phase}"]
                handles[llm, phase] = SplitWorkerHandle(
                    SplitWorkerSpec(f"{llm}/{phase}", llm, phase, spec, pool.handle(),  # type: ignore[arg-type]
                                    dtype=DTYPE_OF_BYTES[spec.dtype_bytes], cores=cores, env=cpu_env(cores)),
                    Path(tmp) / f"{llm}-{phase}.log")
        try:
            start_workers(list(handles.values()), timeout_s=600)
            t0 = time.monotonic()
            decodes = _DecodeReplay(logged, handles, blocks, lock, t0) if "decode" in phases else None
            timeline = []
            for k, job in enumerate(logged.prefills.itertuples()):
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
    out = logged.prefills.assign(sent_s=[a for a, _, _ in timeline], started_s=[b for _, b, _ in timeline],
                                 ended_s=[c for _, _, c in timeline])
    out["measured_s"] = out["ended_s"] - out["sent_s"]
    busy = decodes.spans if decodes is not None else []
    out["charged_s"] = charges(out, logged, busy)
    out.attrs["decode_spans"] = busy
    return out


class _DecodeReplay:
    """The run's decode jobs, each at its logged start on its LLM's decode worker, in a thread: the
    same batch sizes, contexts and step counts (the blocks' contents are whatever the pool holds)."""

    def __init__(self, logged: Logged, handles: dict, blocks: BlockAllocator, lock: threading.Lock, t0: float) -> None:
        self.logged, self.handles, self.blocks, self.lock, self.t0 = logged, handles, blocks, lock, t0
        self.spans: list[tuple[float, float, tuple[int, ...]]] = []  # (start, end, cores) from the replay's start
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


def _send(handle: SplitWorkerHandle, cmd: PrefillCmd | DecodeCmd) -> tuple[PhaseDone, float]:
    sent = time.monotonic()
    handle.send(cmd)
    return handle.recv(120), sent


def charges(jobs: pd.DataFrame, logged: Logged, busy: Sequence[tuple[float, float, tuple[int, ...]]]) -> np.ndarray:
    """What the simulator charges each replayed prefill job under the conditions it was replayed in,
    derived from the replay's timeline as `sim.engine.Simulator._runner_extra` derives them: the
    profile, times the beside factor when a job on other cores ran at its send, plus the extras of
    its first step (dispatch and admission, a token count its worker never ran, how long its cores
    sat idle and whether another worker ran there last; `policies.cost.FirstSteps`, as the simulator)."""
    first_steps = FirstSteps(logged.terms)
    charged = []
    for job in jobs.itertuples():
        worker, cores = f"{job.llm}/prefill", logged.cores[f"{job.llm}/prefill"]
        tokens = int(job.admitted_context)
        extra, _ = first_steps.start(worker, cores, job.sent_s, job.model, tokens, admitting=True)
        beside = any(a <= job.sent_s < b and set(cores).isdisjoint(c) for a, b, c in busy)
        factor = logged.terms.beside_factor(job.model, len(cores), tokens) if beside else 1.0
        charged.append(job.profiled_s * factor + extra)
        first_steps.end(cores, job.ended_s)
    return np.array(charged)


def summary(replays: dict[str, pd.DataFrame], logged: Logged) -> pd.DataFrame:
    """Per condition (and the run itself, measured only): summed time over the summed profile,
    measured and charged, and the median of measured over charged, for jobs whose token count their
    worker had run before (`seen`) and the others."""
    rows = []
    run = logged.prefills.assign(measured_s=logged.prefills["took_s"], charged_s=np.nan)
    for name, jobs in {"the run (logged)": run, **replays}.items():
        for seen, part in [("all", jobs), *((f"seen={flag}", g) for flag, g in jobs.groupby("seen"))]:
            rows.append({"condition": name, "jobs": seen, "n": len(part),
                         "measured ÷ profile": part["measured_s"].sum() / part["profiled_s"].sum(),
                         "charged ÷ profile": part["charged_s"].sum(min_count=1) / part["profiled_s"].sum(),
                         "measured ÷ charged (median)": float((part["measured_s"] / part["charged_s"]).median())})
    return pd.DataFrame(rows).set_index(["condition", "jobs"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a split-mode folder `python -m experiments.validate` wrote")
    ap.add_argument("--level", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=0)
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    args = ap.parse_args()
    try:
        logged = logged_run(args.run, args.level, args.repeat)
        replays = {c: replay(logged, c) for c in args.conditions}
    except ConfigError as e:
        sys.exit(f"ConfigError: {e}")
    print(f"{args.run}: level {args.level}, repeat {args.repeat}: {len(logged.prefills)} prefill jobs, "
          f"{len(logged.decodes)} decode jobs; terms {logged.terms.label}")
    with pd.option_context("display.width", 200):
        print(summary(replays, logged).round(3).to_string())


if __name__ == "__main__":
    main()
