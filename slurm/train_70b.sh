#!/bin/bash
# Llama-3.1-70B RLEF (configs/llama3_70b.yaml), disaggregated, on nodes of 8 x 80 GB H100:
#   training  nodes 1-128: TP 8 x PP 4 x DP 32 = 1024 GPUs, one trainer rank per GPU
#   rollout   nodes 129-160: 32 vLLM workers, one a node at TP 8
# They meet in run.dir (shared filesystem): the trainer publishes weights each iteration, the
# workers write trajectory shards (max staleness 1). Memory plan: tools/plan.py on the config.
#
#   sbatch slurm/train_70b.sh [KEY=VALUE ...]      (from the repository root)
#
# Resumes from run.dir's latest checkpoint; SIGUSR1 5 minutes before the time limit ->
# checkpoint, exit 75, requeue.
#
# The same layout on fewer nodes (the local cluster: tests/test_slurm.py): TRAIN_NODES and
# WORKERS from the environment, e.g. sbatch --nodes=3 --export=ALL,TRAIN_NODES=2,WORKERS=1.
#SBATCH --job-name=rlef-70b
#SBATCH --nodes=160
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
rlef_disaggregated "${TRAIN_NODES:-128}" "${WORKERS:-32}" 8 configs/llama3_70b.yaml "$@"
