"""Decisions and the shared model of the world: specs, cost models, placements, batching policies.

Plain objects only: no SimPy, torch or processes, so both executors (sim/, hwloop/) run them unchanged.
"""
