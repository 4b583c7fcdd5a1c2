"""The simulator: a SimPy executor of placements and batching policies."""

from sim.engine import SimResult, SimulationError, Simulator

__all__ = ["SimResult", "SimulationError", "Simulator"]
