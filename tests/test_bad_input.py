"""Bad input and interruptions (issue 14): every case a new user met is a one-line error or correct
behaviour, never a traceback, never a silent wrong figure, never a corrupt file under a final name.

Most cases call the command's `main` in-process (fast); the signal and exit-status cases run the
real command in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from experiments import place as place_app
from experiments import run as run_app
from experiments import validate as validate_app
from experiments.config import CONF_DIR
from experiments.precheck import precheck
from policies.batching import ADBS, FCFS
from policies.cost import CostModelError, TableCostModel
from policies.placement_algos import PlacerOptions
from traces import Workload, WorkloadError, generate, load, muxserve_synthetic
from traces import __main__ as traces_cli
from traces.ops import MAX_IDLE_GAP_S, skip_idle

# 3 LLMs on 4 roofline GPUs, 3 s of trace: a run takes about a second and needs no data files.
TINY = ["models.types=[llama-7b,llama-7b,llama-13b]", "models.top_rate=3", "cluster.nnodes=1",
        "cluster.gpus_per_node=4", "cost=roofline", "workload.duration_s=3", "report.progress=false",
        "report.plots=false"]


def main(app: object, args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit status, stderr) of a command's main() called in this process, like a shell would."""
    argv, handler = sys.argv, signal.getsignal(signal.SIGTERM)
    root, level = logging.root.handlers[:], logging.root.level
    sys.argv = ["muxsim", *args, f"hydra.run.dir={out}"]
    capsys.readouterr()
    code = 0
    try:
        app.main()  # type: ignore[attr-defined]
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, handler)
        GlobalHydra.instance().clear()
        for h in logging.root.handlers:  # Hydra's, on this test's captured stderr and run.log
            if h not in root:
                h.close()
        logging.root.handlers[:], logging.root.level = root, level
    return code, capsys.readouterr().err


def one_line(stderr: str) -> str:
    """The error line, checked to be the only thing on stderr that is not a log line."""
    lines = [ln for ln in stderr.strip().splitlines() if ln and not ln.startswith("[20")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def error(*args: str) -> str:
    message = precheck(list(args), CONF_DIR)
    assert message is not None, f"{args} was accepted"
    assert "\n" not in message
    return message


# ---- cost tables --------------------------------------------------------------------------------

def tiny_table(cell: object = 20.0) -> dict:
    """A MuxServe latency JSON for llama-7b at TP 1, 100% SM, batches 1 and 2, lengths 32 and 64."""
    grid = {str(b): {str(s): {"prefill": 10.0 + b + s / 32, "decoding": 5.0 + b} for s in (32, 64)}
            for b in (1, 2)}
    grid["2"]["64"]["prefill"] = cell
    return {"llama-7b": {"1": {"100": grid}}}


@pytest.mark.parametrize("cell", [-3, float("nan"), 0, 1e12, float("inf"), "abc", None])
def test_a_bad_latency_cell_is_one_line_naming_file_line_and_cell(tmp_path: Path, cell: object) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(tiny_table(cell), indent=4))
    with pytest.raises(CostModelError) as e:
        TableCostModel.from_muxserve_json(path)
    line = [i for i, text in enumerate(path.read_text().splitlines(), 1) if '"prefill"' in text][-1]
    assert str(e.value).startswith(f"{path}: line {line}: llama-7b/1/100/2/64/prefill = ")
    assert "must be a latency in ms within (0, 3600000], or -1 for not measured" in str(e.value)
    # ... and the run says so before any work, naming the key.
    assert error(f"cost.path={path}").startswith(f"ConfigError: cost.path: {path}: line {line}:")


def test_the_published_minus_one_means_not_measured(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(tiny_table(-1)))
    table = TableCostModel.from_muxserve_json(path)
    assert math.isnan(table.grids[("llama-7b", 1)].prefill[0, 1, 1])


def test_a_bad_profile_cell_names_its_csv_line(tmp_path: Path) -> None:
    path = tmp_path / "profile.csv"
    pd.DataFrame({"model": ["m"] * 3, "tp": [1] * 3, "sm_pct": [100] * 3, "batch": [1, 2, 4], "seq_len": [32] * 3,
                  "phase": ["decode"] * 3, "latency_ms": [1.0, -2.0, 3.0]}).to_csv(path, index=False)
    with pytest.raises(CostModelError, match=r"profile.csv: line 3: latency_ms = -2.0: must be a latency"):
        TableCostModel.from_profile(path)


def test_a_bad_interference_row_names_its_csv_line_and_blank_means_not_measured(tmp_path: Path) -> None:
    path = tmp_path / "interference.csv"
    path.write_text("phase,own_pct,other_pct,slowdown\nprefill,50,50,1.3\ndecode,30,70,\ndecode,30,abc,1.4\n")
    assert error(f"sim.interference={path}") == (f"ConfigError: sim.interference: {path}: line 4: other_pct = 'abc': "
                                                 "must be a number ≥ 0")
    path.write_text("phase,own_pct,other_pct,slowdown\nprefill,50,50,1.3\ndecode,30,70,\n")
    assert precheck([f"sim.interference={path}"], CONF_DIR) is None


# ---- options: batching, placement, simulator ------------------------------------------------------

@pytest.mark.parametrize(("override", "expected"), [
    ("batching.opts.max_prefill_tokens=-1", "batching.opts.max_prefill_tokens must be an integer ≥ 1 (got -1)"),
    ("batching.opts.quota_period_s=-5", "batching.opts.quota_period_s must be a number ≥ 0"),
    ("batching.opts.high_util=-0.5", "batching.opts.high_util must be within (0, 1] (got -0.5)"),
    ("batching.opts.low_util=2", "batching.opts.low_util must be within (0, high_util = 0.9] (got 2)"),
    ("placement.opts.overload_units=-3", "placement.opts.overload_units must be an integer ≥ 0 and ≤ 10 (got -3)"),
    ("placement.opts.batch_limit_per_gpu=0", "placement.opts.batch_limit_per_gpu must be an integer ≥ 1"),
    ("sim.mode=bogus", "sim.mode must be split or mixed (got 'bogus')"),
    ("sim.mode=Mixed", "sim.mode must be split or mixed (got 'Mixed')"),
    ("sim.skip_steps=3", "sim.skip_steps must be true or false (got 3)"),
    ("report.slo_scales=[]", "report.slo_scales must be a non-empty list of numbers > 0"),
    ("workload.seed=-1", "workload.seed must be an integer ≥ 0 (got -1)"),
    ("batching.opts=5", "batching.opts must be a mapping of options (or null) (got 5)"),
    ("systems=[muxserve,muxserve]", "systems: muxserve listed twice"),
])
def test_options_out_of_range_are_one_line_naming_the_key(override: str, expected: str) -> None:
    assert error(*TINY, override).startswith(f"ConfigError: {expected}")


def test_policies_refuse_bad_options_when_built_directly() -> None:
    with pytest.raises(ValueError, match="low_util"):
        ADBS(low_util=0.95, high_util=0.9)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        FCFS(max_prefill_tokens=0)
    with pytest.raises(ValueError, match="overload_units"):
        PlacerOptions(overload_units=-3)


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = main(run_app, [*TINY, "placement.opts.overload_units=-3"], tmp_path, capsys)
    assert code == 2
    assert one_line(err).startswith("ConfigError: placement.opts.overload_units")


# ---- placement: every system's, before any simulation ----------------------------------------------

def test_a_later_systems_placement_error_comes_before_any_simulation(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = ["models.types=[llama-7b,llama-13b,llama-30b]", "models.top_rate=200", "cluster.nnodes=1",
            "cluster.gpus_per_node=8", "cost=roofline", "workload.duration_s=3", "placement=spatial",
            "spatial.rule=fit", "systems=[muxserve,spatial]", "report.progress=false"]
    code, err = main(run_app, args, tmp_path, capsys)
    assert code == 2
    assert one_line(err).startswith("PlacementError: placing spatial: spatial: rule 'fit' needs")
    assert not list(tmp_path.glob("records_*"))  # muxserve did not simulate first


# ---- workloads ---------------------------------------------------------------------------------------

def test_a_workload_too_large_for_memory_is_refused_with_its_size() -> None:
    message = error(*TINY, "workload.scale=1e9")
    assert message.startswith("ConfigError: workload.scale: ") and "GiB" in message and "requests" in message
    with pytest.raises(WorkloadError, match=r"about 4.83e\+11 requests .* estimated .* GiB"):
        generate(muxserve_synthetic(0.9, 1e9), 3)


def saved_workload(tmp_path: Path, suffix: str = ".parquet") -> Path:
    spec = muxserve_synthetic(0.9, 0.05)
    workload = generate(spec, 5, seed=1)
    df = workload.df[workload.df["model"].isin(["llm-0", "llm-1", "llm-2"])].drop(columns="model_type")
    return Workload(df.assign(request_id=range(len(df))).reset_index(drop=True), {}).write(tmp_path / f"w{suffix}")


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_saved_workload_runs_as_workload_file(tmp_path: Path, suffix: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_workload(tmp_path, suffix)
    code, err = main(run_app, [*TINY, "workload=file", f"workload.path={path}", "workload.options=null",
                               "systems=[muxserve]"], tmp_path / "out", capsys)
    assert code == 0, err
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["requests"].iloc[0] == len(Workload.read(path))
    assert summary["workload"].iloc[0] == "workload"


def test_workload_file_needs_a_path() -> None:
    assert error("workload=file") == "ConfigError: workload.path is required for workload format workload (pass workload.path=FILE)"


def test_a_one_request_trace_has_no_rate_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "one.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,120,30\n")
    code, err = main(run_app, [*TINY, "workload=azure", f"workload.path={trace}", "systems=[muxserve]"],
                     tmp_path / "out", capsys)
    assert code == 2
    assert one_line(err) == (f"ConfigError: workload.path: {trace}: its 1 request(s) all arrive at 0 s, so the "
                             "workload has no request rate (it needs at least two distinct arrival times)")


def test_a_century_long_trace_skips_its_empty_time_with_a_warning(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "century.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1900-01-01 00:00:00,100,20\n"
                     "2023-11-16 18:15:46.68,120,30\n")
    t0 = time.monotonic()
    code, err = main(run_app, [*TINY, "workload=azure", f"workload.path={trace}", "workload.options.start_s=null",
                               "workload.options.end_s=null", "systems=[muxserve]"], tmp_path / "out", capsys)
    assert code == 0, err
    assert time.monotonic() - t0 < 60
    assert "idle gap(s) longer than 3600 s shortened" in (tmp_path / "out" / "run.log").read_text()
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").iloc[0]
    assert summary["finished"] == 2 and summary["trace_s"] == MAX_IDLE_GAP_S


def test_skip_idle_keeps_every_request_and_short_gaps() -> None:
    df = pd.DataFrame({"request_id": [0, 1, 2, 3], "model": ["a"] * 4, "arrival_s": [0.0, 1.0, 1e9, 1e9 + 2],
                       "prompt_tokens": [1] * 4, "output_tokens": [1] * 4})
    out = skip_idle(Workload(df, {}), max_gap_s=10)
    assert out.df["arrival_s"].tolist() == [0.0, 1.0, 11.0, 13.0]
    assert out.meta["skipped_s"] == pytest.approx(1e9 - 11)


def test_workload_csv_errors_name_the_file_line(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    path.write_text("request_id,model,arrival_s,prompt_tokens,output_tokens\n0,m,0.0,5,5\n1,m,1.0,-5,5\n")
    with pytest.raises(WorkloadError, match=r"w.csv: line 3: column prompt_tokens must be > 0"):
        Workload.read(path)
    assert traces_cli.main(["stats", str(path)]) == 2


def test_json_list_errors_name_the_record_and_its_line(tmp_path: Path) -> None:
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([good, good, {"id": "x"}], indent=2))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if '"id"' in text) - 1
    with pytest.raises(WorkloadError, match=rf"sharegpt.json: record 2 \(line {line}\): missing column conversations"):
        load(path, format="sharegpt", rate=1.0)


@pytest.mark.parametrize("args", [["--seed", "-1"], ["--cv", "1e308"], ["--duration", "1e308"], ["--scale", "1e308"]])
def test_traces_synth_refuses_what_numpy_would_crash_on(tmp_path: Path, args: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert traces_cli.main(["synth", *args, "-o", str(tmp_path / "w.parquet")]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: ")


# ---- other apps -------------------------------------------------------------------------------------

def test_place_out_a_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = main(place_app, [*TINY[:6], f"out={tmp_path}"], tmp_path / "run", capsys)
    assert code == 2
    assert one_line(err) == f"ConfigError: out: {tmp_path} is a directory; give a file name (e.g. out={tmp_path / 'placement.yaml'})"


@pytest.mark.parametrize(("override", "expected"), [
    ("profile.batches=[-1,0]", "ConfigError: profile.batches must be a non-empty list of integers ≥ 1 (got [-1, 0])"),
    ("profile.repeats=0", "ConfigError: profile.repeats must be an integer ≥ 1 (got 0)"),
    ("workload.rates=[a]", "ConfigError: workload.rates must be a non-empty list of rates > 0 req/s (got ['a'])"),
    ("batching.max_prefill_tokens=0", "ConfigError: batching.max_prefill_tokens must be an integer ≥ 1 (got 0)"),
    ("shapes.0.num_layers=-1", "ConfigError: shapes[0]: model tiny-l4-h512: num_layers must be an integer ≥ 1 (got -1)"),
    ("shapes=[]", "ConfigError: shapes must list at least one model shape"),  # the list is replaceable
])
def test_validate_checks_its_config_before_any_engine(override: str, expected: str) -> None:
    assert validate_app.config_error([override]) == expected


# ---- every request failed ------------------------------------------------------------------------------

def test_a_run_where_every_request_failed_exits_non_zero_saying_why(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, err = main(run_app, [*TINY, "sim.horizon_s=0.001", "systems=[muxserve]"], tmp_path, capsys)
    assert code == 1
    line = [ln for ln in err.splitlines() if ln.startswith("RunError")]
    assert line and "muxserve: all" in line[0] and "not finished by horizon 0.001s; arrives after the run stopped" in line[0]
    assert (tmp_path / "summary.csv").exists()  # the results are still written


# ---- interruptions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_keeps_what_finished_and_marks_the_rest_partial(tmp_path: Path, sig: int, status: int) -> None:
    """spatial (19 LLMs, 10 s) takes about half a second, temporal about four: the signal lands in temporal."""
    cmd = [sys.executable, "-m", "experiments.run", "cost=roofline", "workload.duration_s=10",
           "systems=[spatial,temporal]", "report.progress=false", "report.plots=false", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "records_spatial.parquet").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # into temporal's simulation, which has records by then
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["system"].tolist() == ["spatial"] and summary["interrupted"].tolist() == [True]
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True
    assert pq.read_table(tmp_path / "records_spatial.parquet").num_rows == summary["requests"].iloc[0]
    partial = tmp_path / "records_temporal.partial.parquet"
    assert pq.read_table(partial).num_rows >= 0  # a readable file: its footer was written
    assert not (tmp_path / "records_temporal.parquet").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_complete_run_has_no_partial_files_and_says_it_was_not_interrupted(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[*TINY, "systems=[muxserve,temporal]"])
    res = run_app.run(cfg, tmp_path)
    assert not res.interrupted and res.summary["interrupted"].tolist() == [False, False]
    assert sorted(p.name for p in tmp_path.glob("records_*")) == ["records_muxserve.parquet", "records_temporal.parquet"]
    assert not list(tmp_path.glob("*.tmp"))

