"""Slurm launch: the torch.distributed rendezvous from Slurm's variables, the preflight memory
plan, and submitit orchestration of training, rollout workers and evaluation."""
