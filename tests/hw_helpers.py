"""Shared by the hardware runners' tests: stopping a real replay from outside, as a user would."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

from policies.records import read_records


def interrupt_replay(test_file: str, entry: str, folder: Path, sig: signal.Signals, workers: int,
                     requests: int) -> None:
    """Run `entry(folder)` of `test_file` in a child interpreter (a long replay printing its
    progress and writing `folder/records.parquet`), send it `sig` once the replay is past 1 s, and
    check what Ctrl-C and SIGTERM must leave: the child fails naming the signal, none of its
    `workers` worker processes is left running, and every one of the `requests` requests is
    recorded once, the unfinished ones failed with the signal as the reason."""
    code = (f"import importlib.util; s = importlib.util.spec_from_file_location('t', {test_file!r}); "
            f"m = importlib.util.module_from_spec(s); s.loader.exec_module(m); m.{entry}({str(folder)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("progress") and float(line.split()[1]) > 1.0:
            break
    else:
        pytest.fail(f"the replay never started: {proc.stderr.read() if proc.stderr else ''}")
    children = [p.pid for p in psutil.Process(proc.pid).children()]
    assert len(children) == workers
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and ("SIGTERM" if sig == signal.SIGTERM else "KeyboardInterrupt") in err
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in children)
    rec = read_records(folder / "records.parquet")
    assert sorted(rec.request_id) == list(range(requests))
    failed = rec[rec.status == "failed"]
    assert len(failed) > 0 and failed.reason.str.contains(sig.name).all()


def assert_job_log_matches(jobs: pd.DataFrame | None, stats: dict[str, Any], by: list[str]) -> None:
    """A runner's job log (`log_jobs`) holds every step it counted, once, and a worker's jobs one
    after another: each sent only after the one before it ended."""
    assert jobs is not None and len(jobs) > 0
    assert int(jobs["steps"].sum()) == stats["steps"]
    assert (jobs["start_s"] <= jobs["first_end_s"]).all() and (jobs["first_end_s"] <= jobs["end_s"]).all()
    for _, worker in jobs.sort_values("start_s").groupby(by):
        assert (worker["start_s"].to_numpy()[1:] >= worker["end_s"].to_numpy()[:-1]).all()
