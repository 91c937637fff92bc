"""The benchmark sweep behind ``pluglm bench``: latency and peak memory as the memory grows,
our kernels side by side with the baselines a user would otherwise pick, in one run."""
from .sweep import run_sweep

__all__ = ["run_sweep"]
