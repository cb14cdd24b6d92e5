"""Performance tooling: FLOP counts (flops.py) and the training memory planner (planner.py)."""
