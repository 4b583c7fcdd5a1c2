"""The README's H200 table, from a validate run folder that was cut before its report (no summary.json):
per level, throughput and P50 TTFT/TPOT of the simulator and the first hardware repeat
(`policies.metrics.summarize`), and each phase's job time ÷ the run's profile (`profiled_times`).

    python docs/device/gpu_figures.py RUN_FOLDER
"""
import sys
from pathlib import Path

import pandas as pd

from experiments.validate import profile_frame, profiled_times
from policies.cost import TableCostModel
from policies.metrics import summarize
from policies.specs import ModelSpec

run = Path(sys.argv[1])
table = TableCostModel.from_frame(profile_frame(sorted((run / "profiles").glob("*.parquet"))), "the run's")
specs = {name: ModelSpec(**spec) for name, spec in
         ((s["name"], s) for s in __import__("yaml").safe_load((run / ".hydra/config.yaml").read_text())["shapes"])}
for level in range(10):
    files = {ex: run / f"records_muxserve_L{level}_{ex}.parquet" for ex in ("sim", "hw0")}
    if not all(f.exists() for f in files.values()):
        continue
    out = []
    for ex, f in files.items():
        o = summarize(pd.read_parquet(f)).overall
        jobs = pd.read_parquet(run / f"jobs_muxserve_L{level}_{ex}.parquet")
        took, charged = (jobs["end_s"] - jobs["start_s"]).to_numpy(), profiled_times(jobs, table, specs)
        ratio = {}
        for ph in ("prefill", "decode"):  # summed time ÷ summed profile (the table), and each job's range
            k = (jobs["phase"] == ph).to_numpy()
            ratio[ph] = (took[k].sum() / charged[k].sum(), (took[k] / charged[k]).min(), (took[k] / charged[k]).max())
        out.append((o["throughput_rps"], 1e3 * o["ttft_p50_s"], 1e3 * o["tpot_p50_s"], ratio))
    (s_thr, s_ttft, s_tpot, s_r), (h_thr, h_ttft, h_tpot, h_r) = out
    print(f"L{level}: throughput {s_thr:.2f} / {h_thr:.2f} ({h_thr / s_thr - 1:+.1%}), P50 TTFT {s_ttft:.0f} / {h_ttft:.0f} ms, "
          f"P50 TPOT {s_tpot:.0f} / {h_tpot:.0f} ms; steps ÷ profile, sim / hw: prefill {s_r['prefill'][0]:.2f} / "
          f"{h_r['prefill'][0]:.2f} (jobs {h_r['prefill'][1]:.1f}–{h_r['prefill'][2]:.1f}), decode "
          f"{s_r['decode'][0]:.2f} / {h_r['decode'][0]:.2f}")
