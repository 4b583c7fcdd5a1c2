"""Workloads: every trace source (synthetic or published format) becomes one validated Workload table.

The public API, in one import: specs and the generator (synthetic workloads), loaders for the
published formats with a dispatcher `load`, and operations on loaded Workloads.
"""

from traces.lengths import (
    MUXSERVE_LIMITS,
    SHAREGPT_FIT,
    EmpiricalLengths,
    LengthLimits,
    LengthSampler,
    LognormalLengths,
)
from traces.loaders import (
    FORMATS,
    guess_format,
    load,
    load_azure,
    load_burstgpt,
    load_lmsys,
    load_mooncake,
    load_muxserve_yaml,
    load_sharegpt,
    read_muxserve_yaml,
)
from traces.ops import fit_alpha, rescale_rate, rescale_time, sample, stats, window
from traces.schema import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, Workload, WorkloadError, validate
from traces.spec import (
    Cluster,
    ServedLLM,
    WorkloadSpec,
    muxserve_synthetic,
    power_law_rates,
    power_law_spec,
    setup,
)
from traces.synthetic import arrivals_count, arrivals_until, generate

__all__ = [
    "FORMATS",
    "MUXSERVE_LIMITS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SHAREGPT_FIT",
    "Cluster",
    "EmpiricalLengths",
    "LengthLimits",
    "LengthSampler",
    "LognormalLengths",
    "ServedLLM",
    "Workload",
    "WorkloadError",
    "WorkloadSpec",
    "arrivals_count",
    "arrivals_until",
    "fit_alpha",
    "generate",
    "guess_format",
    "load",
    "load_azure",
    "load_burstgpt",
    "load_lmsys",
    "load_mooncake",
    "load_muxserve_yaml",
    "load_sharegpt",
    "muxserve_synthetic",
    "power_law_rates",
    "power_law_spec",
    "read_muxserve_yaml",
    "rescale_rate",
    "rescale_time",
    "sample",
    "setup",
    "stats",
    "validate",
    "window",
]
