"""Rollouts: the generation engine (vLLM) behind the episodes' generate() callable. Weight
refit from the trainer comes with the rollout issue."""
