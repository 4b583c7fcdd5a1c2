"""How much CPU the runner process itself uses during a split replay (stats runner_cpu_s / replay_s)."""
import sys
import tempfile
from pathlib import Path

from hwloop.replay import RunnerConfig
from hwloop.split_runner import SplitRunner
from policies.batching import make_batching
from tests.test_split import SPECS, placement, two_cores, workload

n, span = int(sys.argv[1]), float(sys.argv[2])
tmp = Path(tempfile.mkdtemp())
r = SplitRunner(workload(n, span, prompts=(8, 90), outputs=(4, 60)), placement(kv_blocks=4000),
                make_batching("adbs", quota_period_s=1.0), SPECS,
                RunnerConfig(gpu_cores=two_cores(), records_path=tmp / "r.parquet", work_dir=tmp / "w"))
res = r.run()
s = res.stats
print({k: s.get(k) for k in ("replay_s", "runner_cpu_s", "steps", "decisions", "decode_runs")},
      "runner cpu share of one core: %.1f%%" % (100 * s["runner_cpu_s"] / s["replay_s"]))
