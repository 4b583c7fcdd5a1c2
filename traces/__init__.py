"""Workloads: every trace source (synthetic or published format) becomes one validated Workload table."""

from traces.schema import REQUIRED_COLUMNS, Workload, WorkloadError, validate

__all__ = ["REQUIRED_COLUMNS", "Workload", "WorkloadError", "validate"]
