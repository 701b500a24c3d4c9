#!/usr/bin/env bash
# Stops the daemons slurm/local/up.sh started (by their PID files: every node's slurmd, then
# slurmctld, slurmdbd, MariaDB, munged), nothing else, and removes its /etc/hosts block.
#   slurm/local/down.sh [STATE_DIR]      (default: /tmp/rlef-slurm)
set -uo pipefail
STATE=$(realpath -m "${1:-${RLEF_SLURM_STATE:-/tmp/rlef-slurm}}")
HOSTS_BEGIN="# >>> rlef-hpc local Slurm (slurm/local/up.sh; down.sh removes) >>>"
HOSTS_END="# <<< rlef-hpc local Slurm <<<"

stop() {
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
}

# The nodes first (slurmd-nodeK.pid; slurmd.pid: a cluster from before there were several).
for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmd.pid"; do stop "$pidfile"; done
for daemon in slurmctld slurmdbd mariadbd munged; do stop "$STATE/$daemon.pid"; done

if grep -qxF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null; then
  # In place (cat >), as up.sh wrote it: /etc/hosts may be bind-mounted.
  hosts=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0==b{skip=1} !skip{print} $0==e{skip=0}' /etc/hosts)
  echo "$hosts" > /etc/hosts
fi
rm -f "$STATE/env" "$STATE/nodes"
echo "down: $STATE"
