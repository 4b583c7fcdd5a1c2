"""The whole validation loop on real vLLM engines, short: profile → saturation → sweep → compare.

No mocks: a real profile is measured, and two real engine processes serve the trace at each load.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.validate import CONF_DIR, config_error, incomplete, validate

pytest.importorskip("vllm")
pytestmark = [pytest.mark.hw, pytest.mark.slow, pytest.mark.timeout(900)]

# Hidden 512 rather than smaller: a smaller model's step is mostly vLLM's Python, which slows down
# far more than the profile shows when two engines alternate on one core (hidden 128: TPOT +115%
# to +240%, measured the same way as below).
TINY = {"name": "tiny-test", "num_layers": 4, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 8,
        "intermediate_size": 1376, "vocab_size": 1024, "max_context": 256}


def config(tmp_path: Path, core: int):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="validate", overrides=[
            f"cores=[{core}]", "systems=[muxserve]", "workload.rates=[2.0,1.0]", "workload.duration_s=8",
            "workload.prompt_mean=96", "workload.output_mean=24", f"profile.dir={tmp_path / 'profiles'}",
            "profile.batches=[1,4,16,64]", "profile.seq_lens=[8,64,192]", "profile.warmup=2", "profile.repeats=8",
            "load.levels=2", "load.lowest=0.3", "load.highest=1.3", "load.repeats=1",
            "report.progress=false", "report.slo_scales=[2,5]"])
    cfg.shapes = OmegaConf.create([TINY])
    return cfg


def test_sim_and_real_engines_agree_at_light_load_and_at_saturation(tmp_path: Path) -> None:
    """Two LLMs of one tiny shape colocated on ONE core under MuxServe's placement and ADBS, so
    their engines take turns: the case the simulator's core slices model. Real profile, its cells
    timed again at the start and the end, real engines, 8 s of trace at two loads: 0.3× and 1.3×
    the rate the simulator says this placement saturates at.

    Asserted: both record sets complete at both loads; at the saturated load the simulator really
    predicts falling behind (its throughput below the arrival rate) and the hardware's throughput
    is within 20% of the simulator's (`SATURATED_BOUND`), plus however far the yardstick moved during the run (profile
    cells, probe, runner terms), where it is set by step times and not by the arrivals; at the light
    load within 10% (it follows the arrivals). Latencies are what `python -m experiments.validate`
    reports (README, Validation); not asserted here, since a step's time on this shared 2-core
    machine varies with other jobs' load.

    The throughput bounds get one second run, from a fresh profile, when the first misses them: on
    CI's shared machine a slow period can outlast the probe's and the cells' view of it (a CI run on
    d826b74 missed by 0.3 points, at -33.7% with the machine 79% slower than profiled during the
    light level). Both runs must pass everything else; the second must pass the bounds.
    """
    misses = throughput_misses(run_and_check(tmp_path / "first"))
    replays_every_job(tmp_path / "first" / "out")
    if misses:
        print(f"first run outside its throughput bounds ({misses}); running once more from a fresh profile")
        misses = throughput_misses(run_and_check(tmp_path / "second"))
    assert not misses, misses


def run_and_check(tmp_path: Path):
    """One short validation, and everything about it that the machine's speed cannot move."""
    t0 = time.monotonic()
    v = validate(config(tmp_path, min(os.sched_getaffinity(0))), tmp_path / "out")
    print(f"validation test: {time.monotonic() - t0:.0f} s wall\n"
          f"{v.rows[['level', 'metric', 'sim', 'hw', 'error']].to_string()}")
    light, saturated = v.comparisons
    assert saturated.offered_rps > 3 * light.offered_rps
    for c in v.comparisons:
        for records in (c.sim, *c.hw):
            assert incomplete(records, c.workload) == []
        assert c.stats["hw"][0]["anomalies"] == []
        # The job logs read against the profile: the simulator's jobs take at least what the profile
        # says (its terms only add), the hardware's within a few times it whatever the load.
        assert c.steps["sim"]["decode_vs_profile"] >= 0.9, c.steps
        assert 0.5 < c.steps["hw"][0]["decode_vs_profile"] < 3, c.steps
        assert 0.3 < c.overall["hw"][0]["probe_vs_profile"] < 5, c.overall["hw"][0]
        assert (tmp_path / "out" / f"jobs_{c.system}_L{c.level}_hw0.parquet").exists()
    rows = v.rows.set_index(["level", "metric"])
    assert rows.loc[(1, "throughput_rps"), "sim"] < 0.95 * saturated.offered_rps, saturated.offered_rps
    assert v.drift is not None and "terms" in v.drift
    terms_drift = v.drift["terms"]
    assert [(r["level"], r["system"]) for r in terms_drift["rows"]] == [(0, "muxserve"), (1, "muxserve")]
    assert set(terms_drift["end_terms"]) == {"tiny-test on 1 core"} and isinstance(terms_drift["flagged"], bool)
    assert len(v.drift["cells"]) == 4  # 2 batches × 2 phases × 1 core count
    assert v.terms is not None and set(v.terms.turn_s) == {("tiny-test", 1)}
    assert (tmp_path / "out" / "summary.csv").exists() and v.plot is not None and v.plot.exists()
    kept = tmp_path / "out" / "profiles"
    assert {p.name for p in v.profiles} | {p.stem + ".terms.json" for p in v.profiles} == {f.name for f in kept.iterdir()}
    report = (tmp_path / "out" / "validation.md").read_text()
    assert "Level 2" in report and "Runner terms repeatability" in report
    return v


def replays_every_job(run: Path) -> None:
    """The light level's hardware run replayed on fresh vLLM workers (`python -m experiments.job_replay`):
    its requests rebuilt from the records, every job run once with the steps and requests it logged
    (the replay refuses otherwise), back to back and at its logged starts; both LLMs' workers share the
    one core, so as run they still take turns. Each job is charged at least its profile."""
    from experiments.config import ConfigError
    from experiments.job_replay import logged_run, replay, summary

    logged = logged_run(run, level=0, repeat=0)
    assert logged.mode == "mixed" and logged.decodes.empty and len(set(logged.jobs["worker"])) == 2
    assert sum(len(a) for a in logged.jobs["admits"]) == len(pd.read_parquet(run / "records_muxserve_L0_hw0.parquet"))
    replays = {c: replay(logged, c) for c in ("back-to-back", "as-run")}
    for jobs in replays.values():
        assert list(jobs["start_s"]) == list(logged.jobs["start_s"])
        assert (jobs["measured_s"] > 0).all() and (jobs["charged_s"] >= jobs["profiled_s"]).all()
    for _, jobs in replays["back-to-back"].groupby("worker"):
        assert (jobs["sent_s"].iloc[1:].to_numpy() >= jobs["ended_s"].iloc[:-1].to_numpy()).all()
    as_run = replays["as-run"].sort_values("sent_s")
    assert (as_run["sent_s"] >= as_run["start_s"] - 1e-3).all()  # none before its logged start
    assert (as_run["sent_s"].iloc[1:].to_numpy() >= as_run["ended_s"].iloc[:-1].to_numpy()).all()  # turns
    table = summary(replays, logged)
    assert set(table.index.get_level_values("jobs")) == {"admitting", "decoding"}
    with pytest.raises(ConfigError, match="a mixed-mode run replays under back-to-back, as-run"):
        replay(logged, "with-decodes")


# Issue 16 asks for 10% at saturation. Measured at this level: -1.6%, +2.0%, +2.6%, +10.5%, +1.3%, and
# -21.4% with the probe +22% (fresh clones of 07e741e, AMD EPYC machines); on the Intel Xeon machine of
# 2026-12-03, with the machine steady (probe +3% to +5%): -17.1%, -7.6% (d826b74), -19.5% and -14.3% (a
# fresh clone of 8dfb467, both runs of one test). There the hardware's steps admitting prompts ran 15-40%
# over what the simulator charges (README, Validation, split section: the same prefill gap, not yet
# found), a bias rather than noise, so this test, which guards the loop against regressions, asserts
# 20%; the 10% target is the validation command's, and is not met on that machine.
SATURATED_BOUND = 0.20


def throughput_misses(v) -> list[str]:
    """The throughput bounds this run misses. Light load: within 10% (throughput follows the
    arrivals). Saturated: within `SATURATED_BOUND`, widened by how far the yardstick itself moved,
    the most of three measured ways: the profile's cells timed again at the start and the end, the
    probe during the saturated run (hwloop.speed; the cells are timed before and after the runs, not
    during them), and the simulator's own throughput with the runner's terms measured again at the
    end. The simulator's step times are the profile's, so a machine that ran 8% slower than while it
    was profiled moves the saturated throughput by about as much."""
    rows = v.rows.set_index(["level", "metric"])
    terms_moved = v.drift["terms"]["max"]["throughput_rps"]
    probe = rows.loc[(1, "probe_vs_profile"), "hw"] - 1
    moved = max(abs(v.drift["start_vs_profile_median"]), abs(v.drift["end_vs_start_median"]), abs(probe), terms_moved)
    print(f"yardstick moved {moved:.1%} during the run (profile cells {v.drift['start_vs_profile_median']:+.1%} and "
          f"{v.drift['end_vs_start_median']:+.1%}, probe {probe:+.1%}, simulator with the end's terms {terms_moved:.1%})")
    return [f"level {level}: throughput {error:+.1%} outside ±{bound:.1%}"
            for level, bound in ((0, 0.10), (1, SATURATED_BOUND + moved))
            if abs(error := rows.loc[(level, "throughput_rps"), "error"]) > bound]


def test_bad_config_is_one_line() -> None:
    assert config_error(["systems=[spatial]", "workload.rates=[1,1,1]", "cores=[0,1]"]) == (
        "ConfigError: systems: spatial gives each LLM its own cores: 3 LLMs need ≥ 3 cores, 2 given "
        "(drop spatial or add cores)")
    assert config_error(["workload.rates=[]"]).startswith("ConfigError: workload.rates")
    assert config_error(["nosuchkey=1"]).startswith("ConfigError: Could not override 'nosuchkey'")
    assert config_error(["load.levels=0"]).startswith("ConfigError: load.levels")
    assert config_error(["workload.rates=[3.0,0.01]"]) == (
        "ConfigError: workload.rates[1] = 0.01 req/s: llm-1 gets no request in 15 s of trace (seed 0); raise its "
        "rate or workload.duration_s")


def test_bad_gpu_config_is_one_line() -> None:
    """device=cuda is checked before any work: split mode only, one GPU (no spatial), profiled shares
    in whole SM units with 100% among them, and a CUDA build of torch."""
    split = ["device=cuda", "mode=split", "systems=[muxserve]"]
    assert config_error(["device=cuda"]).startswith("ConfigError: device=cuda runs split mode")
    assert config_error(["device=tpu"]) == "ConfigError: device must be cpu or cuda, got 'tpu'"
    assert config_error(["device=cuda", "mode=split"]).startswith("ConfigError: systems: spatial gives each LLM its own GPU")
    assert config_error([*split, "gpu.shares=[30,55]"]) == (
        "ConfigError: gpu.shares must be multiples of 10% up to 100, 100 among them (got [30, 55])")
    assert config_error([*split, "gpu.partition=none"]).startswith(
        "ConfigError: gpu.partition=none gives every worker the whole GPU: gpu.shares must be [100]")
    if torch.version.cuda is None:
        assert config_error([*split, "gpu.partition=none", "gpu.shares=[100]"]) == (
            f"ConfigError: device=cuda: this torch {torch.__version__} is a CPU build")
