"""Entry points: Hydra apps that turn configs into placements, simulations, tables and figures."""
