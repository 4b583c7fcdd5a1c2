"""Fuzz of the config checks: random overrides of `experiments.run`, good and bad values mixed.

Property: a command line either stops with one line naming what is wrong (the pre-check, or a
user error raised by the run before or while it works; both exit with status 2), or it runs, and
then its records keep the invariants: every request of the workload exactly once, finished or
failed with a reason, and only complete files under their final names. Never a traceback.

Runs `run()` in this process (no subprocesses), on 2 LLMs and 2 s of trace, so a few dozen
examples take well under a minute on 2 cores.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments.config import CONF_DIR, build_workload
from experiments.precheck import precheck
from experiments.run import _user_errors, run

BASE = ["models.types=[llama-7b,llama-13b]", "models.top_rate=2", "cluster.nnodes=1", "cluster.gpus_per_node=4",
        "cost=roofline", "workload.duration_s=2", "systems=[muxserve]", "report.progress=false",
        "report.plots=false"]

BAD = ["-1", "0", "nan", "inf", "abc", "null", "true", "[1]", "1e308", "1.5"]
# Per key: values a user might type, valid ones kept small so that every run stays short.
VALUES: dict[str, list[str]] = {
    "workload.alpha": ["0", "0.9", "2.1", *BAD],
    "workload.scale": ["0.5", "1", "1e9", *BAD],
    "workload.cv": ["0.5", "1", "4", *BAD],
    "workload.duration_s": ["1", "2.5", *BAD],
    "workload.seed": ["0", "7", "9223372036854775808", *BAD],
    "workload.kind": ["synthetic", "trace", "bogus"],
    "models.top_rate": ["1", "3", *BAD],
    "models.types": ["[llama-7b]", "[llama-7b,llama-30b]", "[]", "[gpt-5]", "[1]", "llama-7b"],
    "cluster.nnodes": ["1", "2", *BAD],
    "cluster.gpus_per_node": ["1", "2", "8", *BAD],
    "cluster.gpu": ["A100-80GB", "H200", "bogus", "5", "null"],
    "cost.compute_efficiency": ["0.5", "1", "2", *BAD],
    "cost.bw_saturation_share": ["0.2", "1", *BAD],
    "placement": ["muxserve", "temporal", "spatial", "search"],
    "placement.opts.overload_units": ["0", "2", "10", "11", "-3", *BAD],
    "placement.opts.batch_limit_per_gpu": ["1", "16", *BAD],
    "placement.opts.decode_shares": ["[30,50]", "[100]", "[]", "[5]", "[110]", "[33]", *BAD],
    "placement.opts.prune": ["true", "false", *BAD],
    "batching": ["adbs", "fcfs", "round_robin"],
    "batching.opts.max_prefill_tokens": ["1", "64", "2048", *BAD],
    "batching.opts.quota_period_s": ["0", "0.5", "5", *BAD],
    "batching.opts.high_util": ["0.5", "0.9", "1", *BAD],
    "batching.opts.low_util": ["0.1", "0.5", "0.95", *BAD],
    "sim.mode": ["split", "mixed", "bogus", "Mixed", *BAD],
    "sim.skip_steps": ["true", "false", *BAD],
    "sim.horizon_s": ["null", "0.5", "3", "100", *BAD],
    "report.slo_scales": ["[1,2]", "[1.5]", "[]", "[0]", "[-1]", "[abc]", "5"],
    "report.records": ["true", "false", *BAD],
    "systems": ["[muxserve]", "[spatial,temporal]", "[muxserve+round_robin]", "[bogus]", "[]", "muxserve",
                "[muxserve,muxserve]"],
}

OVERRIDES = {key: [f"{key}={v}" for v in values] for key, values in VALUES.items()}
overrides = st.sets(st.sampled_from(sorted(VALUES)), max_size=4).flatmap(
    lambda keys: st.tuples(*(st.sampled_from(OVERRIDES[k]) for k in sorted(keys))))
_runs = itertools.count()


def check_records(cfg: object, out: Path, res: object) -> None:
    workload = build_workload(cfg)  # type: ignore[arg-type]
    ids = sorted(workload.df["request_id"])
    for system, records in res.records.items():  # type: ignore[attr-defined]
        assert sorted(records["request_id"]) == ids, system  # none lost, none twice
        assert set(records["status"]) <= {"finished", "failed"}
        failed = records[records["status"] == "failed"]
        assert (failed["reason"] != "").all()
        done = records[records["status"] == "finished"]
        assert (done["finish_s"] >= done["arrival_s"]).all()
        if cfg.report.records:  # type: ignore[attr-defined]
            on_disk = pd.read_parquet(out / f"records_{system}.parquet")
            assert len(on_disk) == len(records)
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["requests"] == len(ids)).all() and not summary["interrupted"].any()
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.partial.parquet"))


# MUXSIM_FUZZ_EXAMPLES=1000 for a deeper search than `make test` affords.
@settings(max_examples=int(os.environ.get("MUXSIM_FUZZ_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides)
def test_random_overrides_give_one_line_or_a_sound_run(extra: tuple[str, ...]) -> None:
    argv = [*BASE, *extra]
    message = precheck(argv, CONF_DIR)
    if message is not None:
        assert "\n" not in message and message.startswith("ConfigError: "), message
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / str(next(_runs))
        try:
            res = run(cfg, out)
        except _user_errors() as e:  # reported in one line by the command, exit status 2
            assert "\n" not in str(e), str(e)
            return
        check_records(cfg, out, res)


# ---- experiments.validate's set-up (everything it checks before an engine starts) -------------------

VALIDATE_VALUES: dict[str, list[str]] = {
    "systems": ["[muxserve]", "[spatial,temporal]", "[]", "[bogus]", "muxserve"],
    "cores": ["null", "[0]", "[]", "[99999]", "abc", "[-1]"],
    "workload.rates": ["[1.0]", "[2,1]", "[]", "[0]", "[abc]", "5", *BAD],
    "workload.duration_s": ["5", *BAD],
    "workload.cv": ["1", *BAD],
    "workload.prompt_mean": ["64", *BAD],
    "workload.length_sigma": ["0.5", *BAD],
    "workload.seed": ["0", *BAD],
    "profile.batches": ["[1,2]", "[-1,0]", "[]", "[1.5]", "abc", "[true]"],
    "profile.seq_lens": ["[8,64]", "[0]", "[]", "[100000]", "abc"],
    "profile.warmup": ["0", "2", *BAD],
    "profile.repeats": ["1", "5", *BAD],
    "batching.max_prefill_tokens": ["64", "2048", *BAD],
    "targets.throughput": ["0.1", *BAD],
    "load.levels": ["2", *BAD],
    "load.repeats": ["1", *BAD],
    "report.slo_scales": ["[2,5]", "[]", "[0]", "[abc]"],
    "models.0.num_layers": ["2", "0", "-1", "abc", "1.5"],
    "models.0.num_heads": ["8", "3", "0"],
    "cluster.nnodes": ["1", "2", *BAD],
}
VALIDATE_OVERRIDES = {key: [f"{key}={v}" for v in values] for key, values in VALIDATE_VALUES.items()}
validate_overrides = st.sets(st.sampled_from(sorted(VALIDATE_VALUES)), max_size=4).flatmap(
    lambda keys: st.tuples(*(st.sampled_from(VALIDATE_OVERRIDES[k]) for k in sorted(keys))))


@settings(max_examples=int(os.environ.get("MUXSIM_FUZZ_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(validate_overrides)
def test_validate_config_checks_give_one_line_or_a_setup(extra: tuple[str, ...]) -> None:
    """`config_error` runs every check of build_setup (workload generated, no profile, no engine)."""
    from experiments.validate import USER_ERRORS, config_error

    message = config_error(list(extra))
    names = tuple(f"{e.__name__}: " for e in USER_ERRORS)
    assert message is None or ("\n" not in message and message.startswith(names)), message
