"""The machine-speed probe (`hwloop.speed`): real threads, real CPU time."""

from __future__ import annotations

import os
import time

from hwloop.speed import SpeedMonitor, probe_ms, speed_summary


def test_the_probe_counts_cpu_time_not_waiting() -> None:
    """A probe's CPU time is that of its loop: positive, and the same order whether or not the
    thread then sleeps (sleeping adds wall time, not CPU time)."""
    alone = sorted(probe_ms() for _ in range(9))[4]
    assert 0 < alone < 1000
    t = time.thread_time()
    time.sleep(0.05)
    assert time.thread_time() - t < 0.02  # a sleeping thread uses (almost) no CPU time


def test_the_monitor_samples_every_core_it_is_given_and_stops() -> None:
    mine = os.sched_getaffinity(0)
    cores = sorted(mine)[:2]
    with SpeedMonitor(cores, period_s=0.01) as monitor:
        time.sleep(0.5)
    n = len(monitor.samples)
    assert n >= 4 * len(cores)
    assert {c for c, _ in monitor.samples} == set(cores)
    time.sleep(0.05)
    assert len(monitor.samples) == n  # stopped: no sample after the block
    s = monitor.summary()
    assert s["n"] == n and s["p10"] <= s["median"] <= s["p90"] and set(s["per_core"]) == {str(c) for c in cores}
    assert os.sched_getaffinity(0) == mine  # only the monitor's thread was pinned, not its caller


def test_no_samples_give_an_empty_summary() -> None:
    assert speed_summary([]) == {}


def test_the_command_prints_each_second_and_a_summary(capsys) -> None:
    from hwloop.speed import main

    main(["--seconds", "1.5", "--cores", str(min(os.sched_getaffinity(0)))])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "core" in lines[0] and lines[-1].startswith("median ")
