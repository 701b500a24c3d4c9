#!/bin/bash
# Evaluate a run's checkpoints (rlef_hpc.launch.jobs: the evaluation protocol, eval.*): each due
# one not yet in run.dir/eval/results.jsonl (the initial policy, every run.eval_every, the
# last) and where the run stands, exported to Hugging Face and generated with vLLM, on the
# run's valid and test problems (run.dir/problems/valid.jsonl, test.jsonl); the curve in
# run.dir/eval/, the best on valid exported to run.dir/best/. One node; vLLM at
# rollout.tensor_parallel GPUs.
#
#   sbatch slurm/eval.sh CONFIG [KEY=VALUE ...]            e.g. configs/llama3_70b.yaml
#   sbatch --gpus-per-node=0 slurm/eval.sh configs/demo_cpu.yaml     (CPU clusters)
#   sbatch --dependency=afterok:TRAIN_JOB slurm/eval.sh CONFIG       (after training)
#   sbatch slurm/eval.sh CONFIG --follow --trainer-job TRAIN_JOB     (alongside training,
#                                              until the trainer's job ends)
#
# SIGUSR1 (300 s before the time limit), SIGTERM (preemption, scancel, `scontrol requeue`):
# the evaluation in progress stops at once (exit 75; what results.jsonl holds stays) and the
# job is requeued; the requeued job redoes that checkpoint and goes on.
#SBATCH --job-name=rlef-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=4:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source slurm/lib.sh
[ $# -ge 1 ] || { echo "usage: sbatch slurm/eval.sh CONFIG [KEY=VALUE ...]" >&2; exit 2; }
srun "$RLEF_PYTHON" -m rlef_hpc.launch.jobs eval "$@"
rlef_finish $?
