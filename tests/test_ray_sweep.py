"""Sweeps through Hydra's Ray launcher on a real local Ray cluster, against the joblib launcher.

The test starts its own Ray head on localhost (`ray start --head --block` in a new process group,
so that stopping it ends exactly the processes it started), runs one small sweep through
`hydra/launcher=ray_cluster` (conf/hydra/launcher) and the same sweep through the default joblib launcher, and checks that the
collected tables agree in every result column. Needs the `ray` extra (hydra-ray-launcher, ray),
which `make test` installs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("ray")
pytest.importorskip("hydra_plugins.hydra_ray_launcher")

REPO = Path(__file__).resolve().parents[1]
# Two jobs of a tiny run: 3 LLMs on 4 roofline GPUs for 3 s of trace, two popularity skews.
SWEEP = ["-m", "experiment=demo", "models.types=[llama-7b,llama-7b,llama-13b]", "models.top_rate=3",
         "cluster.nnodes=1", "cluster.gpus_per_node=4", "cost=roofline", "workload.duration_s=3",
         "workload.alpha=0.7,2.1"]
# What differs between two runs of the same jobs: wall-clock timings and where the files went.
NOT_RESULTS = ("stat_placement_s", "stat_simulate_s", "stat_simulate_cpu_s", "job", "job_dir")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_executable() -> str:
    path = Path(sys.executable).with_name("ray")
    return str(path) if path.exists() else "ray"


def sweep(sweep_dir: Path, *extra: str, env: dict[str, str] | None = None) -> pd.DataFrame:
    p = subprocess.run([sys.executable, "-m", "experiments.run", *SWEEP, f"hydra.sweep.dir={sweep_dir}", *extra],
                       capture_output=True, text=True, timeout=420, cwd=REPO, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    launched = "Ray Launcher is launching 2 jobs" in p.stdout + p.stderr
    assert launched == ("hydra/launcher=ray_cluster" in extra), (p.stdout + p.stderr)[-3000:]
    return pd.read_csv(sweep_dir / "collected.csv")


def stop(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block`, which shuts its Ray processes down; then SIGKILL to whatever of
    its process group (only what it started) is left."""
    if head.poll() is None:
        head.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=90)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_launcher_sweep_equals_the_joblib_sweep(tmp_path: Path) -> None:
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Unix socket paths must stay under 108 bytes
    log = (tmp_path / "ray_head.log").open("w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [ray_executable(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        address = env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while subprocess.run([ray_executable(), "status", f"--address={address}"], capture_output=True, env=env,
                             timeout=60).returncode != 0:
            assert head.poll() is None, f"ray start --head exited: {(tmp_path / 'ray_head.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the Ray head did not come up within 120 s"
            time.sleep(2)
        on_ray = sweep(tmp_path / "ray_sweep", "hydra/launcher=ray_cluster",
                       env=env)
    finally:
        stop(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    on_joblib = sweep(tmp_path / "joblib_sweep")
    assert len(on_ray) == 6  # 2 jobs × 3 systems
    keys = ["workload.alpha", "system"]
    on_ray, on_joblib = (t.drop(columns=[c for c in NOT_RESULTS if c in t.columns]).sort_values(keys)
                         .reset_index(drop=True) for t in (on_ray, on_joblib))
    assert list(on_ray.columns) == list(on_joblib.columns)
    pd.testing.assert_frame_equal(on_ray, on_joblib)
