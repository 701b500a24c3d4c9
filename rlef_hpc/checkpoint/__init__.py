"""Checkpoints: the one place that knows how megatron lays parameters out across ranks."""
