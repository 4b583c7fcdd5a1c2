"""Decode runs: a decode job that covers several steps in one SimPy event, timed at once.

Why skipping is exact (the one place this argument is written; tests/test_sim.py and
tests/test_sim_cores.py check that skipping gives the records of step-by-step execution):
- A run is only extended while no other process on its unit could start anything
  (`UnitLedger.idle_work` is false). Any policy would then relaunch the same decode at each step
  boundary: the batching contract (`policies.view.BatchingPolicy`) has a lone decode take all its
  LLM's idle running requests, and `decide` is a pure function of the view.
- It ends at the first step boundary at or after the next thing that could change the unit (an
  arrival, another job's end, a quota tick), so every decision sees the unit as step by step would.
- It ends before its KV blocks would overflow the slack (`policies.ledger.steps_within_kv`); the
  blocks of its last step are taken when it is planned, since step by step they would be held by
  the time anything else on the unit can look.
- It ends when a request in it finishes, unless no request waits anywhere on the unit: then only
  the batch itself could use what the finish frees, so the run goes on with the batch shrunk (as
  the relaunched decode would be), and each finished request is recorded at its own step.
- Step latencies are summed one at a time from the run's start, in the order SimPy would add them,
  and the vectorised lookup does the scalar lookup's float operations (`policies.cost.Curve`), so
  both give the same times bit for bit. With interference a run keeps one slowdown factor (nothing
  starts beside it while it runs); the step that contains the next event is rescaled at that event,
  as it is step by step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from policies.cost import CostModel
from policies.ledger import Batch, grows_within, steps_within_kv
from policies.view import Request

# Up to this many steps a run is timed with scalar lookups; numpy's per-call costs dominate below it.
SHORT_RUN = 16


class SimulationError(RuntimeError):
    """A run that cannot be simulated as asked (unplaced LLM, a policy breaking a budget, an
    unmeasured latency). Defined here, below `sim.engine`, which raises it too."""


@dataclass(eq=False, slots=True)
class Job:
    """A batch in simulated time: when it ends, and for a decode run, each step's boundary."""

    job_id: int
    batch: Batch
    sm_pct: int
    end: float
    start: float = math.nan  # when it got its cores and began (the job log's start)
    alone_s: float = math.nan  # prefill and mixed steps: duration at this share with nothing beside it
    factor: float = 1.0  # interference slowdown from the jobs beside it (Simulator._interfere)
    first_extra_s: float = 0.0  # decode runs: the runner's extra for the first step (Simulator._runner_extra)
    version: int = 0  # bumped when interference moves `end`
    steps: int | None = None  # decode runs only: number of steps in this run
    # Set by `plan` for a run of several steps; empty tuples until then, which cost no allocation per job.
    boundaries: Sequence[float] = ()  # decode runs: when each planned step ends
    # Runs past their first finish: (tokens to go at launch, index in the batch) of the requests met
    # in `_segments`, in the order they finish; every request that finishes before the last step is here.
    _finishing: Sequence[tuple[int, int]] = ()

    def plan(self, cost: CostModel, now: float, slack: int, horizon: float, through_finishes: bool = False) -> None:
        """Choose how many steps this decode run covers and when each ends.

        Steps: while the batch's KV growth fits `slack` (blocks for step 0 are already held), up to
        the first boundary at or after `horizon` (−inf: a single step), and until the first request
        finishes. With `through_finishes`, until the last one does instead: the batch shrinks at each
        finish, as the decode relaunched after it would (the caller knows nothing else could start).

        The per-request list is only built when the run goes past its first finish or its KV
        growth has to be counted: most runs end at the next event before either.
        """
        batch = self.batch
        llm = batch.llm
        n, total = len(batch.requests), batch.decoding_context
        step_time = cost.decode_curve(llm.spec, llm.placement.tp, self.sm_pct, n)
        # Integer sums, then one division: the same mean context step-by-step execution computes.
        d = step_time(total / n) * self.factor + self.first_extra_s
        if not math.isfinite(d):
            self._unmeasured(cost)
        self.steps, self.end = 1, now + d
        if self.end >= horizon:
            return  # the first step already reaches the next event: the common case under load
        min_left = batch.min_left
        if min_left == 1 and not through_finishes:
            return
        boundaries = [self.end]  # step 0, timed above
        # Steps 1..min_left-1: the whole batch, until its first finish.
        t = self._time_steps(cost, step_time, n, total, min_left, boundaries, horizon)
        left: list[int] = []  # tokens each request of the batch has to go, once needed
        if len(boundaries) == min_left and t < horizon and through_finishes:  # on past the first finish
            left = [r.output_tokens - r.generated for r in batch.requests]
            finishing: list[tuple[int, int]] = []
            self._finishing = finishing
            for alive, alive_ctx, stop in _segments(batch.requests, left, total, finishing):
                if stop <= min_left:
                    continue  # the first stretch, timed above
                step_time = cost.decode_curve(llm.spec, llm.placement.tp, self.sm_pct, alive)
                t = self._time_steps(cost, step_time, alive, alive_ctx, stop, boundaries, horizon)
                if len(boundaries) < stop or t >= horizon:
                    break  # stopped at `horizon`, or where the arrays were capped
        if not math.isfinite(t):  # an unmeasured cell makes its step, and so every later boundary, infinite
            self._unmeasured(cost)
        self.boundaries = boundaries
        steps = min(self._steps_to(horizon), len(boundaries))  # timed first: the KV check stops there
        chunks = slack // llm.chunk_blocks
        if steps > 1 and not grows_within(n, steps, chunks):
            contexts = [r.prompt_tokens + r.generated for r in batch.requests]
            left = left or [r.output_tokens - r.generated for r in batch.requests]
            steps = steps_within_kv(contexts, left, steps, chunks)
        self._set_steps(steps)

    def _time_steps(self, cost: CostModel, step_time: Callable[[float], float], alive: int, alive_ctx: int,
                    stop: int, boundaries: list[float], horizon: float) -> float:
        """Time steps len(boundaries)..stop-1 of `alive` requests whose contexts summed `alive_ctx` at
        step 0, appending each end to `boundaries`, up to the first at or after `horizon` (or fewer,
        where a long stretch's arrays are capped); returns the last end.

        Boundaries are sequential sums from the run's start, as SimPy adds one step at a time.
        """
        start, t = len(boundaries), boundaries[-1]
        cap = stop
        if stop - start > SHORT_RUN and horizon < math.inf:
            # Keep the arrays to the steps that fit before `horizon` while step latency does not fall
            # with context. Any cap is exact: a run that ends early is relaunched as it is.
            step = step_time((alive_ctx + alive * start) / alive) * self.factor
            if step > 0:
                cap = min(stop, start + math.ceil((horizon - t) / step) + 1)
        if cap - start <= SHORT_RUN:  # few steps to the horizon: numpy's per-call costs would dominate
            factor = self.factor
            for s in range(start, stop):
                t += step_time((alive_ctx + alive * s) / alive) * factor
                boundaries.append(t)
                if t >= horizon:
                    break
            return t
        llm = self.batch.llm
        means = (alive_ctx + alive * np.arange(start, cap, dtype=np.int64)) / alive
        durations = cost.decode_times(llm.spec, llm.placement.tp, self.sm_pct, alive, means) * self.factor
        boundaries += np.add.accumulate(np.concatenate(([t], durations)))[1:].tolist()
        return boundaries[-1]

    def _unmeasured(self, cost: CostModel) -> None:
        llm = self.batch.llm
        raise SimulationError(f"{cost.label}: no decode latency for {llm.name} ({llm.spec.name}) batch "
                              f"{len(self.batch.requests)} at {self.sm_pct}% SM (unmeasured cell)")

    def _steps_to(self, t: float) -> int:
        """Steps up to and including the first boundary at or after `t`."""
        return bisect.bisect_left(self.boundaries, t) + 1

    def _set_steps(self, k: int) -> None:
        self.steps = k
        self.end = self.boundaries[k - 1]

    def truncate(self, t: float) -> None:
        """End at the first step boundary at or after `t`, if that is earlier than planned."""
        if self.steps is not None and self.steps > 1 and self.end > t:
            self._set_steps(self._steps_to(t))

    def early_finishers(self) -> list[tuple[float, Request]]:
        """The requests that finish before the run's last step, with their finish times, earliest
        first (batch order within a step, as step by step). Call once, after the last `truncate`."""
        if self.steps is None or self.steps <= self.batch.min_left:
            return []  # nobody finishes before the last step
        requests, steps, boundaries = self.batch.requests, self.steps, self.boundaries
        return [(boundaries[left - 1], requests[i]) for left, i in self._finishing if left < steps]


def _segments(requests: list[Request], left: list[int], total: int,
              finishing: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """Stretches of a decode run over which its batch stays the same, in order, covering steps
    0..max(left)-1: (requests, their summed context at step 0, the step the stretch ends before;
    each starts where the previous one ended). `left[i]` is how many tokens `requests[i]` has to
    go: it takes part in steps 0..left[i]-1. The contexts sum to `total`. Each request met is
    appended to `finishing` as (left, index): earliest finish first, batch order within a step.

    The batch's indices are sorted by `left` at once, in C (a stable sort: batch order within a
    step); a request's context is only read when the run goes past its finish.
    """
    n, start = len(requests), 0
    for index in sorted(range(n), key=left.__getitem__):
        request_left = left[index]
        finishing.append((request_left, index))
        if request_left > start:
            yield n, total, request_left
            start = request_left
        r = requests[index]
        n -= 1
        total -= r.prompt_tokens + r.generated
