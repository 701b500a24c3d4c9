#!/bin/bash
# Llama-3.1-8B RLEF (configs/llama3_8b.yaml), disaggregated, on nodes of 8 x 80 GB H100:
#   training  nodes 1-16: TP 4 x DP 32 = 128 GPUs, one trainer rank per GPU
#   rollout   nodes 17-20: 16 vLLM workers at TP 2, four a node
# They meet in run.dir (shared filesystem): published weights, trajectory shards.
#
#   sbatch slurm/train_8b.sh [KEY=VALUE ...]       (from the repository root)
#
# Resumes from run.dir's latest checkpoint; SIGUSR1 5 minutes before the time limit ->
# checkpoint, exit 75, requeue.
#
# The same layout on fewer nodes (the local cluster: tests/test_slurm.py): TRAIN_NODES and
# WORKERS from the environment, e.g. sbatch --nodes=3 --export=ALL,TRAIN_NODES=2,WORKERS=4.
#SBATCH --job-name=rlef-8b
#SBATCH --nodes=20
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
rlef_disaggregated "${TRAIN_NODES:-16}" "${WORKERS:-16}" 2 configs/llama3_8b.yaml "$@"
