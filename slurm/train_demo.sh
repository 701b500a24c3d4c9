#!/bin/bash
# The CPU demo (configs/demo_cpu.yaml) as a Slurm job, e.g. on the local cluster
# (slurm/local/up.sh, then `source /tmp/rlef-slurm/env`). From the repository root:
#
#   sbatch slurm/train_demo.sh [KEY=VALUE ...]                  colocated: 1 task, 2 CPUs
#   sbatch --export=ALL,LAYOUT=disaggregated slurm/train_demo.sh   trainer + 1 rollout worker
#   sbatch --nodes=3 --export=ALL,LAYOUT=disaggregated slurm/train_demo.sh \
#     parallel.tensor=2 parallel.data=2                       multi-node: see below
#
# Layout: 1 node, no GPU, 2 tasks. Colocated: one trainer rank with its vLLM (CPU) engine.
# Disaggregated: a trainer task and a rollout-worker task, one CPU each. Multi-node
# (disaggregated, --nodes=N > 1): the trainer on the first N-1 nodes, 2 ranks a node (TP2 x
# DP(N-1): each tensor-parallel pair on one node), WORKERS rollout workers (default 1) on the
# last node. Resumes from run.dir's latest checkpoint; requeued (and resumed) after SIGUSR1
# 60 s before the time limit.
#SBATCH --job-name=rlef-demo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --mem=8G
#SBATCH --time=60
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source slurm/lib.sh
if [ "${LAYOUT:-colocated}" = disaggregated ]; then
  if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then
    rlef_disaggregated $((SLURM_JOB_NUM_NODES - 1)) "${WORKERS:-1}" 0 configs/demo_cpu.yaml "$@"
  else
    # One node: one of its two tasks trains, the other is the rollout worker.
    TRAIN_TASKS_PER_NODE=1 rlef_disaggregated 1 1 0 configs/demo_cpu.yaml "$@"
  fi
else
  # One trainer rank using both CPUs.
  OMP_NUM_THREADS=2 srun --ntasks=1 --cpus-per-task=2 --kill-on-bad-exit=1 \
    "$RLEF_PYTHON" -m rlef_hpc.train.cli configs/demo_cpu.yaml "$@"
  rlef_finish $?
fi
