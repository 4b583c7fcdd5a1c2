"""The simulator: a SimPy executor of placements and batching policies, and the shared metrics."""

from sim.engine import SimResult, SimulationError, Simulator

__all__ = ["SimResult", "SimulationError", "Simulator"]
