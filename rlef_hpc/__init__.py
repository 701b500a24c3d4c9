"""rlef-hpc: RLEF (reinforcement learning from execution feedback) at cluster scale."""

__version__ = "0.1.0"
