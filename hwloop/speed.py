"""How fast the machine runs right now: a probe sampled while a profile is measured and while a run replays.

    python -m hwloop.speed --seconds 60     # the probe on each core, once a second: is this a slow period?

On this project's shared CPU machines the same engine step takes 1.6–2× longer for seconds to
minutes at a time, whatever else our own processes do (a vLLM decode step of a tiny Llama: 3.0 ms
in one minute, 5–6 ms in the next; README, Validation). A step profile measured in one state then
misjudges a run made in the other, and the error looks like the simulator's. The probe lets the
report say which state each was measured in:

- the probe is a fixed pure-Python loop (what a small model's step mostly is: vLLM's Python, not
  its matrix products, which the slow state hardly touches), timed in the thread's own CPU time,
  so time spent waiting for a core that an engine holds does not count, only how fast the core
  runs it;
- `SpeedMonitor` runs it every `period_s` on a daemon thread pinned to each of the given cores in
  turn: about 0.1% of a core, beside the engines it watches. The profiler runs one while it
  measures (`meta["speed_probe_ms"]`), each hardware run another (`stats["speed_probe_ms"]`); their
  ratio is how much slower the machine ran than when it was profiled.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

PROBE_LOOPS = 20_000  # about 0.35 ms of CPU time on the project's 2-core machine, fast state


def probe_ms(loops: int = PROBE_LOOPS) -> float:
    """CPU time of this thread running a fixed Python loop, in ms."""
    t = time.thread_time()
    total = 0
    for i in range(loops):
        total += i
    return (time.thread_time() - t) * 1e3


class SpeedMonitor:
    """Samples `probe_ms` every `period_s` on each of `cores` in turn, until stopped."""

    def __init__(self, cores: Sequence[int], period_s: float = 0.5) -> None:
        self.cores, self.period_s = tuple(cores), period_s
        self.samples: list[tuple[int, float]] = []  # (core, ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="speed-monitor", daemon=True)

    def __enter__(self) -> SpeedMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        tid = threading.get_native_id()
        k = 0
        while not self._stop.wait(self.period_s):
            core = self.cores[k % len(self.cores)] if self.cores else -1
            if core >= 0:
                os.sched_setaffinity(tid, {core})
            self.samples.append((core, probe_ms()))
            k += 1

    def summary(self) -> dict[str, Any]:
        """Median and spread of the samples (ms), overall and per core; empty when none was taken."""
        return speed_summary(self.samples)


def speed_summary(samples: Sequence[tuple[int, float]]) -> dict[str, Any]:
    if not samples:
        return {}
    ms = sorted(s for _, s in samples)
    per_core = {str(c): statistics.median([s for core, s in samples if core == c]) for c in sorted({c for c, _ in samples})}
    return {"median": statistics.median(ms), "p10": ms[len(ms) // 10], "p90": ms[(9 * len(ms)) // 10],
            "n": len(ms), "per_core": per_core, "probe_loops": PROBE_LOOPS}


def main(argv: Sequence[str] | None = None) -> None:
    """Print the probe's median on each core every second: run it before a validation to see
    whether the machine is in a slow period (its medians well above those of a quiet minute)."""
    ap = argparse.ArgumentParser(prog="python -m hwloop.speed", description=main.__doc__)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--cores", type=int, nargs="*", help="default: every core this process may use")
    args = ap.parse_args(argv)
    cores = tuple(args.cores) if args.cores else tuple(sorted(os.sched_getaffinity(0)))
    with SpeedMonitor(cores, period_s=0.05) as monitor:
        shown, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1.0)
            new, shown = monitor.samples[shown:], len(monitor.samples)
            per_core = speed_summary(new).get("per_core", {})
            print(f"{time.monotonic() - t0:6.1f} s  " + "  ".join(f"core {c}: {ms:.3f} ms" for c, ms in per_core.items()),
                  flush=True)
    s = monitor.summary()
    print(f"median {s['median']:.3f} ms (p10 {s['p10']:.3f}, p90 {s['p90']:.3f}) over {s['n']} probes of "
          f"{PROBE_LOOPS} loop iterations")


if __name__ == "__main__":
    main()
