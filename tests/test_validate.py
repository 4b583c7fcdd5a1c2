"""The whole validation loop on real vLLM engines, short: profile → place → simulate → run → compare.

No mocks: a real profile is measured, and two real engine processes serve the trace.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.validate import CONF_DIR, config_error, incomplete, validate

pytest.importorskip("vllm")
pytestmark = [pytest.mark.hw, pytest.mark.slow, pytest.mark.timeout(300)]

# Hidden 512 rather than smaller: a smaller model's step is mostly vLLM's Python, which slows down
# far more than the profile shows when two engines alternate on one core (hidden 128: TPOT +115%
# to +240%, measured the same way as below).
TINY = {"name": "tiny-test", "num_layers": 4, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 8,
        "intermediate_size": 1376, "vocab_size": 1024, "max_context": 256}


def config(tmp_path: Path, core: int):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="validate", overrides=[
            f"cores=[{core}]", "systems=[muxserve]", "workload.rates=[6.0,3.0]", "workload.duration_s=12",
            "workload.prompt_mean=96", "workload.output_mean=24", f"profile.dir={tmp_path / 'profiles'}",
            "profile.batches=[1,4,16]", "profile.seq_lens=[8,64,192]", "profile.warmup=2", "profile.repeats=8",
            "report.progress=false", "report.slo_scales=[2,5]"])
    cfg.models = OmegaConf.create([TINY])
    return cfg


def test_sim_and_real_engines_agree_within_the_stated_bounds(tmp_path: Path) -> None:
    """Two LLMs of one tiny shape colocated on ONE core under MuxServe's placement and ADBS, so
    their engines take turns: the case the simulator's core slices model (and the one that takes
    longest to drift if a step is charged wrongly). Real profile, real engines, 12 s of trace.

    Bounds, measured with this configuration on the project's 2-core machine (4 runs, other jobs
    on it, load average 2–5): throughput within 10% (measured −2.8% to +0.4%: it follows the
    arrivals); P50 TTFT and P50 TPOT within a factor of 3 either way (measured: TTFT +5% to +59%,
    TPOT −1% to +113%); launches deferred for busy cores within 40% of the simulator's count
    (measured hw/sim 0.90–1.10). The margin is for load: a step's time varies with other processes'
    load, in the profile and in the run (README, Validation: one command measured temporal's P50
    TPOT +41% in one run and +1599% in another when the load rose). The issue's 10% target is what
    `python -m experiments.validate` reports; it is not asserted here.
    """
    t0 = time.monotonic()
    v = validate(config(tmp_path, min(os.sched_getaffinity(0))), tmp_path / "out")
    wall = time.monotonic() - t0
    (c,) = v.comparisons
    for executor in ("sim", "hw"):
        assert incomplete(c.records[executor], v.setup.workload) == [], executor
    assert c.stats["hw"]["anomalies"] == []
    deferred = c.stats["hw"]["deferred_launches"], c.stats["sim"]["deferred_launches"]
    assert deferred[1] > 0 and 0.6 <= deferred[0] / deferred[1] <= 1.4, deferred
    rows = v.rows.set_index("metric")
    assert abs(rows.loc["throughput_rps", "error"]) <= 0.10, rows
    for key in ("ttft_p50_s", "tpot_p50_s"):
        ratio = rows.loc[key, "hw"] / rows.loc[key, "sim"]
        assert 1 / 3 <= ratio <= 3, rows
    assert (tmp_path / "out" / "summary.csv").exists() and v.plot is not None and v.plot.exists()
    print(f"validation test: {wall:.0f} s wall\n{v.rows[['metric', 'sim', 'hw', 'error']].to_string()}")


def test_bad_config_is_one_line() -> None:
    assert config_error(["systems=[spatial]", "workload.rates=[1,1,1]", "cores=[0,1]"]) == (
        "ConfigError: systems: spatial gives each LLM its own cores: 3 LLMs need ≥ 3 cores, 2 given "
        "(drop spatial or add cores)")
    assert config_error(["workload.rates=[]"]).startswith("ConfigError: workload.rates")
    assert config_error(["nosuchkey=1"]).startswith("ConfigError: Could not override 'nosuchkey'")
