#!/bin/bash
# The CPU demo (configs/demo_cpu.yaml) as a Slurm job, e.g. on the local cluster
# (slurm/local/up.sh, then `source /tmp/rlef-slurm/env`). From the repository root:
#
#   sbatch slurm/train_demo.sh [KEY=VALUE ...]                  colocated: 1 task, 2 CPUs
#   sbatch --export=ALL,LAYOUT=disaggregated slurm/train_demo.sh   trainer + 1 rollout worker
#
# Layout: 1 node, no GPU. Colocated: one trainer rank with its vLLM (CPU) engine. Disaggregated:
# a trainer task and a rollout-worker task, one CPU each. Resumes from run.dir's latest
# checkpoint; requeued (and resumed) after SIGUSR1 60 s before the time limit.
#SBATCH --job-name=rlef-demo
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --mem=8G
#SBATCH --time=60
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source slurm/lib.sh
if [ "${LAYOUT:-colocated}" = disaggregated ]; then
  rlef_disaggregated 1 1 0 configs/demo_cpu.yaml "$@"
else
  # One trainer rank using both CPUs.
  OMP_NUM_THREADS=2 srun --ntasks=1 --cpus-per-task=2 --kill-on-bad-exit=1 \
    "$RLEF_PYTHON" -m rlef_hpc.train.cli configs/demo_cpu.yaml "$@"
  rlef_finish $?
fi
