#!/usr/bin/env bash
# Stops the daemons slurm/local/up.sh started (by their PID files), nothing else.
#   slurm/local/down.sh [STATE_DIR]      (default: /tmp/rlef-slurm)
set -uo pipefail
STATE=$(realpath -m "${1:-${RLEF_SLURM_STATE:-/tmp/rlef-slurm}}")
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
  pidfile="$STATE/$daemon.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
done
rm -f "$STATE/env"
echo "down: $STATE"
