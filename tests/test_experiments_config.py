"""experiments.config / precheck: every config mistake is one line that names the key, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from experiments.config import (
    ConfigError,
    placement_opts,
    system_policies,
    validate,
    with_model_types,
)
from experiments.precheck import precheck, variants
from experiments.run import CONF_DIR, run
from experiments.systems import run_system
from traces import Workload

# A tiny run: 3 LLMs on 4 roofline GPUs for 3 s of trace; needs no data outside the repository.
TINY = ["models.types=[llama-7b,llama-7b,llama-13b]", "models.top_rate=3", "cluster.nnodes=1",
        "cluster.gpus_per_node=4", "cost=roofline", "workload.duration_s=3"]


def composed(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def error(*args: str) -> str:
    message = precheck(list(args), CONF_DIR)
    assert message is not None, f"{args} was accepted"
    assert "\n" not in message
    return message


def test_the_default_config_validates() -> None:
    assert precheck([], CONF_DIR) is None
    assert precheck(["-m", "workload.alpha=0.7,2.1", "systems=[muxserve]"], CONF_DIR) is None


@pytest.mark.parametrize("preset", ["demo", "paper_synthetic", "max_rate", "chatlmsys"])
def test_presets_leave_the_launcher_replaceable(preset: str) -> None:
    """Ray and submitit have no n_jobs, so a preset must not set it outside conf/hydra/launcher."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        joblib = compose(config_name="config", overrides=[f"experiment={preset}"], return_hydra_config=True)
        basic = compose(config_name="config", overrides=[f"experiment={preset}", "hydra/launcher=basic"],
                        return_hydra_config=True)
    assert joblib.hydra.launcher.n_jobs == 2
    assert "n_jobs" not in basic.hydra.launcher


def test_unknown_group_option_names_the_group_and_the_choices() -> None:
    message = error("cluster=a100x64")
    assert "cluster" in message and "a100x64" in message and "a100x32" in message


def test_unknown_key_names_the_key() -> None:
    assert "workload.alpah" in error("workload.alpah=1")


@pytest.mark.parametrize(("override", "expected"), [
    ("workload.duration_s=-1", "ConfigError: workload.duration_s must be > 0 (got -1)"),
    ("workload.alpha=-0.5", "ConfigError: workload.alpha must be ≥ 0 (got -0.5)"),
    ("workload.cv=abc", "ConfigError: workload.cv must be a finite number (got 'abc')"),
    ("cluster.nnodes=0", "ConfigError: cluster.nnodes must be an integer ≥ 1 (got 0)"),
    ("sim.horizon_s=0", "ConfigError: sim.horizon_s must be > 0 or null (got 0)"),
])
def test_bad_values_name_the_key(override: str, expected: str) -> None:
    assert error(override) == expected


def test_every_swept_value_is_checked_before_the_sweep() -> None:
    assert error("-m", "workload.alpha=0.7,-2,2.1") == "ConfigError: workload.alpha must be ≥ 0 (got -2)"
    assert variants(["a.b=1,2", "c=3"]) == [["a.b=1", "c=3"], ["a.b=2", "c=3"]]


def test_unknown_systems_and_options() -> None:
    assert error("systems=[muxserve,vllm]").startswith("ConfigError: systems: unknown system 'vllm'")
    assert "placement.opts" in error("+placement.opts.bogus=1")
    assert "batching.opts" in error("batching=fcfs", "+batching.opts.quota_period=2")
    assert "models.types" in error("models.types=[llama-7b,gpt-5]")
    assert error("systems=[]") == "ConfigError: systems must list at least one system (got [])"


def test_missing_files_point_at_the_fix(tmp_path: Path) -> None:
    assert "cost.path" in error(f"cost.path={tmp_path / 'none.json'}") and "cost=roofline" in error(
        f"cost.path={tmp_path / 'none.json'}")
    assert error("cost=profile") == "ConfigError: cost.path is required for cost=profile (pass cost.path=FILE)"
    assert "workload.path is required" in error("workload=sharegpt")
    assert "workload.path" in error("workload=azure", f"workload.path={tmp_path / 'none.csv'}")


def test_hwloop_runner_resolves_and_refuses_what_hardware_cannot_run_in_one_line(tmp_path: Path) -> None:
    assert precheck(["runner=hwloop"], CONF_DIR) is None
    for mode, why in (("split", "host memory available"), ("mixed", "GiB available")):
        p = subprocess.run([sys.executable, "-m", "experiments.run", "runner=hwloop", f"sim.mode={mode}", *TINY,
                            "systems=[spatial]", f"hydra.run.dir={tmp_path}"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("ConfigError: while running spatial: runner=hwloop:") and why in last


def test_cli_exits_2_with_one_line() -> None:
    p = subprocess.run([sys.executable, "-m", "experiments.run", "workload.duration_s=-1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip() == "ConfigError: workload.duration_s must be > 0 (got -1)"


def test_system_pairs_and_options() -> None:
    assert system_policies("temporal") == ("temporal", "fcfs")
    assert system_policies("muxserve+round_robin") == ("muxserve", "round_robin")
    cfg = composed(["placement.opts.decode_shares=[50,60]"])
    assert placement_opts(cfg, "muxserve")["decode_shares"] == (50, 60)
    assert placement_opts(cfg, "spatial") == {"spatial_rule": "paper", "spatial_gpus": ()}


def test_the_spatial_block_reaches_the_spatial_placer_whatever_the_placement_group() -> None:
    cfg = composed(["spatial.rule=fit-cluster", "spatial.gpus={llm-0:2}"])
    assert placement_opts(cfg, "spatial") == {"spatial_rule": "fit-cluster", "spatial_gpus": (("llm-0", 2),)}
    assert "spatial_rule" not in placement_opts(cfg, "muxserve")
    assert error("spatial.rule=bogus") == "ConfigError: spatial: rule must be one of paper, fit, fit-cluster (got 'bogus')"
    assert error("spatial.gpus={llm-0:3}") == ("ConfigError: spatial: gpus: llm-0: the GPU count must be a power of "
                                               "two ≥ 1 (got 3)")


def test_a_cluster_too_small_for_the_spatial_rule_fails_before_any_simulation(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "experiments.run", *TINY, "cluster.gpus_per_node=2",
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == ("PlacementError: placing spatial: spatial: rule 'paper' needs 3 GPUs for the "
                                "3 LLMs, the cluster has 2 (short by 1; no rule fits: even the smallest meshes "
                                "need 3 GPUs)")
    assert not (tmp_path / "records_muxserve.parquet").exists()  # nothing simulated first


def test_trace_llms_get_model_types_in_order_of_appearance() -> None:
    df = pd.DataFrame({"request_id": [0, 1, 2], "model": ["b", "a", "b"], "arrival_s": [0.0, 1.0, 2.0],
                       "prompt_tokens": [10, 10, 10], "output_tokens": [5, 5, 5]})
    typed = with_model_types(Workload(df, {}), ["llama-7b", "llama-13b"])
    assert typed.df["model_type"].tolist() == ["llama-7b", "llama-13b", "llama-7b"]
    with pytest.raises(ConfigError, match=r"models\.types"):
        with_model_types(Workload(df, {}), ["llama-7b"])


def interrupting_runner(system: str, *args: Any, **kwargs: Any) -> Any:
    """Stands for Ctrl-C pressed while the second system runs."""
    if system == "spatial":
        raise KeyboardInterrupt
    return run_system(system, *args, **kwargs)


def test_interrupted_run_keeps_the_finished_systems(tmp_path: Path) -> None:
    cfg = composed([*TINY, "systems=[muxserve,spatial,temporal]", "report.progress=false",
                    f"runner.target={__name__}.interrupting_runner"])
    validate(cfg)
    res = run(cfg, tmp_path)
    assert res.interrupted
    assert res.summary["system"].tolist() == ["muxserve"]
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["system"].tolist() == ["muxserve"] and summary["throughput_rps"].iloc[0] > 0
    assert (tmp_path / "records_muxserve.parquet").exists()
    assert (tmp_path / "slo_attainment.png").exists()


def test_a_placer_batcher_pair_runs_as_one_system(tmp_path: Path) -> None:
    cfg = composed([*TINY, "systems=[muxserve+round_robin]", "report.progress=false", "report.plots=false"])
    res = run(cfg, tmp_path)
    row = res.summary.iloc[0]
    assert (row["system"], row["placer"], row["batcher"]) == ("muxserve+round_robin", "muxserve", "round_robin")
    assert row["finished"] > 0 and (tmp_path / "records_muxserve+round_robin.parquet").exists()


def test_interference_fitted_from_co_run_measurements_slows_jobs_sharing_a_unit(tmp_path: Path) -> None:
    csv = tmp_path / "interference.csv"
    pd.DataFrame({"phase": ["prefill", "prefill", "decode", "decode"], "own_pct": [50, 70, 30, 40],
                  "other_pct": [50, 30, 70, 60], "slowdown": [1.3, 1.25, 1.4, 1.35]}).to_csv(csv, index=False)
    base = [*TINY, "systems=[muxserve]", "report.progress=false", "report.plots=false"]
    alone = run(composed(base), tmp_path / "alone").summary.iloc[0]
    slowed = run(composed([*base, f"sim.interference={csv}"]), tmp_path / "slowed").summary.iloc[0]
    assert "stat_rescaled_jobs" not in alone and slowed["stat_rescaled_jobs"] > 0
    assert slowed["latency_mean_s"] > alone["latency_mean_s"]
    assert error(f"sim.interference={tmp_path / 'none.csv'}").startswith("ConfigError: sim.interference:")
    assert "runner=sim" in error("runner=hwloop", f"sim.interference={csv}")
