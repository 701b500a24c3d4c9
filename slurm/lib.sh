# Shared by the sbatch scripts (sourced; run from the repository root): the Python to use, the
# torch.distributed rendezvous (the trainer derives RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
# from Slurm's variables itself: rlef_hpc/dist_env.py), and requeue on a checkpointed stop.
#
# Preemption and time limits: the scripts ask for `--signal=USR1@N` (to the job steps) and
# `--requeue`. The trainer answers SIGUSR1/SIGTERM by finishing its iteration, saving a
# checkpoint and exiting with 75; the script then requeues the job, which resumes from it.
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
if [ -z "${RLEF_PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then RLEF_PYTHON=.venv/bin/python; else RLEF_PYTHON=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
EXIT_PREEMPTED=75
echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $*"

# Requeue after a clean stop (exit 75: the trainer checkpointed, or an evaluation stopped);
# otherwise pass the status on.
rlef_finish() {
  local rc=$1
  if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
    echo "stopped cleanly (exit $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$rc"
}

# rlef_colocated CONFIG [KEY=VALUE ...]: one trainer rank per task of the job, each with its
# share of a vLLM engine (one engine per tensor-parallel group). Tasks are not bound to cores:
# at TP > 1 only each group's first rank runs episodes in the sandbox, over the node's CPUs.
rlef_colocated() {
  srun --kill-on-bad-exit=1 --cpu-bind=none "$RLEF_PYTHON" -m rlef_hpc.train.cli "$@"
  rlef_finish $?
}

# rlef_task_mem_mb: one task's share (MB) of the job's memory on a node: the node's memory
# split evenly over the job's tasks per node. With `--mem=0` Slurm sets no SLURM_MEM_PER_NODE
# (the job has the whole node): the node's RealMemory, then.
rlef_task_mem_mb() {
  local node_mb=${SLURM_MEM_PER_NODE:-} per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}
  if [ -z "$node_mb" ] || [ "$node_mb" -eq 0 ]; then
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
    node_mb=$(scontrol -o show node "$first" | grep -o 'RealMemory=[0-9]*' | cut -d= -f2)
  fi
  echo $((node_mb / ${per_node:-1}))
}

# rlef_disaggregated TRAIN_NODES WORKERS ROLLOUT_GPUS CONFIG [KEY=VALUE ...]: the trainer on
# the job's first TRAIN_NODES nodes (one rank per task: the job's --ntasks-per-node a node, or
# TRAIN_TASKS_PER_NODE where the workers share its nodes), WORKERS rollout workers (one task
# and ROLLOUT_GPUS GPUs each) spread over the rest, in turn (on the trainer's nodes when the
# job has no others). The trainer's ranks are placed in blocks (ranks 0..n-1 on the first
# node, ...), so a tensor-parallel group of consecutive ranks stays on one node when
# parallel.tensor divides the tasks a node; the trainer refuses to start otherwise.
# Memory: a worker asks one task's share of its node, the trainer its tasks' shares of each of
# its nodes, so that workers sharing a node run at once instead of queueing for memory.
rlef_disaggregated() {
  local train_nodes=$1 workers=$2 gpus=$3
  shift 3
  local nodes
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  if [ "$train_nodes" -gt ${#nodes[@]} ]; then
    echo "error: the trainer needs $train_nodes nodes, the job has ${#nodes[@]}" \
      "(${SLURM_JOB_NODELIST}): sbatch --nodes, or TRAIN_NODES for a smaller layout" >&2
    exit 2
  fi
  local trainers=("${nodes[@]:0:$train_nodes}") rest=("${nodes[@]:$train_nodes}")
  [ ${#rest[@]} -gt 0 ] || rest=("${trainers[@]}")
  local per_node=${TRAIN_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}} task_mb
  task_mb=$(rlef_task_mem_mb)
  # The job's --gpus-per-node reaches every step (SLURM_GPUS_PER_NODE) and outranks a step's
  # --gpus-per-task: each worker would get all of its node's GPUs and the next worker step on
  # that node would wait for them. A one-task step's own --gpus-per-node overrides it.
  # rollout.layout=disaggregated to the workers too: they validate the config as the trainer
  # does, and a TP/PP trainer is refused with the colocated layout (the demo config's).
  local gpu_flag=() pids=() i
  [ "$gpus" -gt 0 ] && gpu_flag=(--gpus-per-node="$gpus")
  for ((i = 0; i < workers; i++)); do
    srun --exact --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
      --mem="${task_mb}M" "${gpu_flag[@]}" \
      --nodelist="${rest[$((i % ${#rest[@]}))]}" \
      "$RLEF_PYTHON" -m rlef_hpc.train.rollout_worker "$1" "$i" "${@:2}" \
      rollout.workers="$workers" rollout.layout=disaggregated &
    pids+=($!)
  done
  srun --exact --kill-on-bad-exit=1 --nodes="$train_nodes" --ntasks=$((train_nodes * per_node)) \
    --ntasks-per-node="$per_node" --distribution=block \
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --mem="$((task_mb * per_node))M" \
    --nodelist="$(IFS=,; echo "${trainers[*]}")" \
    "$RLEF_PYTHON" -m rlef_hpc.train.cli "$@" rollout.layout=disaggregated
  local rc=$?
  # Done: the workers see the DONE marker and exit; stopped: they are stopped with the job.
  [ "$rc" -eq 0 ] && wait "${pids[@]}" || kill "${pids[@]}" 2>/dev/null
  rlef_finish "$rc"
}
