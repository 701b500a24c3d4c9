"""RL: the RLEF PPO objective and the update step. Knows models; never imports vLLM."""
