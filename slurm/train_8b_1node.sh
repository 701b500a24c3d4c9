#!/bin/bash
# Llama-3.1-8B RLEF (configs/llama3_8b_1node.yaml) on ONE node of 8 x 80 GB GPUs, colocated:
#   8 trainer ranks, one per GPU: TP 4 x DP 2; each tensor-parallel group of 4 GPUs also runs
#   one vLLM engine at TP 4 in the same processes (it generates, sleeps through the update,
#   refits from the trainer's shards in place). No rollout workers, no second node.
#
#   sbatch slurm/train_8b_1node.sh [KEY=VALUE ...]       (from the repository root)
#
# Every task sees all 8 GPUs (the job's --gpus-per-node; no per-task binding): a rank takes the
# GPU of its local rank, and so does its engine (vLLM's external_launcher uses cuda:LOCAL_RANK).
# Tasks are not bound to their cores either: the sandbox of each engine's episodes runs on its
# group's first rank (rollout.sandbox_workers processes), on its group's half of the node's CPUs.
# Resumes from run.dir's latest checkpoint; SIGUSR1 5 minutes before the time limit ->
# checkpoint, exit 75, requeue.
#SBATCH --job-name=rlef-8b-1node
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source slurm/lib.sh
rlef_colocated configs/llama3_8b_1node.yaml "$@"
