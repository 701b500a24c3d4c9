"""Models: the tokenizer here; the Megatron-core policy and value networks come with the PPO
issue. Nothing in this package's namespace imports torch or megatron eagerly."""
