"""The hardware loop: the same placements and batching policies, driving real vLLM engines.

Kept import-light on purpose: a worker process imports this package before it pins itself to its
cores, and torch must not be loaded before that.
"""
