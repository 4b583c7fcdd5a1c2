"""experiments.gpu_calibrate: its CPU smoke mode end to end, and the decisions it makes on a GPU
(partition from the probes, job order, budget, grid caps) on probe results written by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.gpu_calibrate import (
    Job,
    choose_partition,
    expected_s,
    gpu_plan,
    job_order,
)
from hwloop.profiler import read_profile
from policies.cost import InterferenceModel, TableCostModel
from policies.specs import GiB, ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_mode_writes_every_file(tmp_path: Path) -> None:
    out = tmp_path / "cal"
    done = subprocess.run([sys.executable, "-m", "experiments.gpu_calibrate", "--out", str(out), "--tiny",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["failed"] and not summary["skipped"] and len(summary["done"]) == 3
    spec = ModelSpec("tiny-llama", 2, 64, 4, 4, 172, 512)
    cost = TableCostModel.from_profile(out / "profile.csv")
    assert cost.prefill_time(spec, 1, 50, 2, 24) > 0 and cost.decode_time(spec, 1, 100, 1, 20) > 0
    meta = read_profile(out / "profile.csv").meta
    assert meta["engine"] == "torch" and meta["calibration"]["partition"] == "cores"
    assert [j["share"] for j in meta["jobs"]] == [100, 50] and meta["jobs"][0]["versions"]["torch"]
    table = InterferenceModel.from_csv(out / "interference.csv")
    assert set(table.coef) == {"prefill", "decode"}
    assert "fit" in json.loads((out / "interference.meta.json").read_text())
    assert (out / "calibrate.log").read_text() and json.loads((out / "probe.json").read_text())["device"] == "cpu"


def mps_probe(ok: bool, slowdown: float = 2.0) -> dict:
    if not ok:
        return {"ok": False, "stage": "daemon start", "error": "nvidia-cuda-mps-control not found"}
    return {"ok": True, "slowdown_at_50pct": slowdown, "partitions": slowdown >= 1.3}


def test_partition_prefers_mps_then_green_then_none() -> None:
    green = {"ok": True, "result": {"slowdown": 1.9}}
    assert choose_partition({"mps": mps_probe(True), "green": green}, "auto")[0] == "mps"
    part, why = choose_partition({"mps": mps_probe(False), "green": green}, "auto")
    assert part == "green" and "not found" in why
    part, why = choose_partition({"mps": mps_probe(True, 1.02), "green": {"ok": False, "error": "SUPPORTED is false"}},
                                 "auto")
    assert part == "none" and "not enforced" in why and "SUPPORTED" in why
    assert choose_partition({}, "mps") == ("mps", "forced by --partition")


def test_jobs_run_100pct_first_then_interference_then_the_other_shares() -> None:
    plan = gpu_plan(["llama-7b", "llama-13b"], 80 * GiB)
    jobs = job_order(plan, [100, 50, 30], interference=True, profiles=True)
    assert [(j.kind, j.model.name, j.share) for j in jobs] == [
        ("profile", "llama-7b", 100), ("profile", "llama-13b", 100), ("interference", "llama-7b", 100),
        ("profile", "llama-7b", 50), ("profile", "llama-13b", 50), ("profile", "llama-7b", 30),
        ("profile", "llama-13b", 30)]
    seven, thirteen = plan.models
    history = [(Job("profile", seven, 100), 20.0)]
    assert expected_s(Job("profile", seven, 50), history) == 40.0
    assert 75 < expected_s(Job("profile", thirteen, 50), history) < 80  # × 13B/7B parameters
    assert expected_s(Job("interference", seven), history) == 0.0


def test_gpu_grid_keeps_kv_caches_within_memory() -> None:
    plan = gpu_plan(["llama-7b", "llama-13b"], 80 * GiB)
    for spec in plan.models:
        grid = plan.grids[spec.name]
        assert spec.max_context >= max(grid.seq_lens) + grid.warmup + grid.repeats + 1
        for cell in grid.cells():
            tokens = cell.batch * (cell.seq_len + grid.warmup + grid.repeats + 1)
            assert spec.weight_bytes + tokens * spec.kv_bytes_per_token < 0.9 * 80 * GiB
            assert cell.phase == "decode" or cell.batch * cell.seq_len <= 16384
        assert {c.batch for c in grid.cells()} == set(grid.batches)  # every batch has cells in both phases
