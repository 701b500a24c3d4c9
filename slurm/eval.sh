#!/bin/bash
# Evaluate a run: its latest checkpoint exported to Hugging Face (run.dir/export/iter_N), then
# 1@3 with vLLM on the run's evaluation problems (run.dir/problems/eval.jsonl), report in
# run.dir/eval/job_iter_N/. One node; vLLM at rollout.tensor_parallel GPUs.
#
#   sbatch slurm/eval.sh CONFIG [KEY=VALUE ...]            e.g. configs/llama3_70b.yaml
#   sbatch --gpus-per-node=0 slurm/eval.sh configs/demo_cpu.yaml     (CPU clusters)
#   sbatch --dependency=afterok:TRAIN_JOB slurm/eval.sh CONFIG       (after training)
#SBATCH --job-name=rlef-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=4:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
source slurm/lib.sh
[ $# -ge 1 ] || { echo "usage: sbatch slurm/eval.sh CONFIG [KEY=VALUE ...]" >&2; exit 2; }
srun "$RLEF_PYTHON" -m rlef_hpc.launch.jobs eval "$@"
