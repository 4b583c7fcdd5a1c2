"""The runner's own CPU during a mixed replay: two tiny vLLM engines, one core each (muxserve-like)."""
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from hwloop.replay import RunnerConfig
from hwloop.runner import Runner
from policies.batching import make_batching
from policies.placement import LLMPlacement, Placement, Unit
from policies.specs import ModelSpec
from traces.schema import Workload

rate, span = float(sys.argv[1]), float(sys.argv[2])
spec = ModelSpec("tiny-l4-h512", 4, 512, 8, 8, 1376, 1024, max_context=512)
rng = np.random.default_rng(0)
n = int(2 * rate * span)
wl = Workload(pd.DataFrame({"request_id": np.arange(n), "model": [("llm-0", "llm-1")[i % 2] for i in range(n)],
                            "arrival_s": np.sort(rng.uniform(0, span, n)),
                            "prompt_tokens": rng.integers(16, 200, n), "output_tokens": rng.integers(8, 90, n)}))
llms = tuple(LLMPlacement(f"llm-{i}", spec.name, 1, 50, 50, 256, rate=rate) for i in range(2))
pl = Placement("t", (Unit(0, 0, (0,), llms, kv_blocks=200000),))
tmp = Path(tempfile.mkdtemp())
r = Runner(wl, pl, make_batching("adbs", max_prefill_tokens=2048), {spec.name: spec},
           RunnerConfig(gpu_cores={0: (0, 1)}, records_path=tmp / "r.parquet", work_dir=tmp / "w"))
s = r.run().stats
print({k: s.get(k) for k in ("replay_s", "runner_cpu_s", "steps", "decisions", "decode_runs")},
      "runner cpu: %.1f%% of one core" % (100 * s["runner_cpu_s"] / s["replay_s"]))
