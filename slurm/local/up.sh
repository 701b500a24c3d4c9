#!/usr/bin/env bash
# A real Slurm cluster of NODES nodes on one machine's loopback, for tests and for trying the
# launch path (multi-node layouts included) on one machine: munge, MariaDB + slurmdbd
# (accounting: submitit needs job states), slurmctld, and one slurmd per node (`slurmd -N
# nodeK`), each started by this script with a PID file under the state directory.
#
#   NODES=3 slurm/local/up.sh [STATE_DIR]   (default: 2 nodes, /tmp/rlef-slurm; root only)
#   source STATE_DIR/env                    SLURM_CONF for sbatch, srun, squeue, scontrol
#   slurm/local/down.sh [STATE_DIR]         stops what up.sh started, nothing else
#
# Nodes node1..nodeN: each its own address (127.0.2.K, in /etc/hosts between marker lines,
# so that a rendezvous at "the job's first node" resolves), slurmd port, spool directory, log,
# 16 CPU slots and 8 stand-in GPUs. NODES=1 is the small single-node cluster.
#
# Installs Debian's slurmctld, slurmd, slurmdbd, slurm-client, munge and mariadb-server when
# they are missing. Idempotent: a cluster already up with as many nodes is left as it is.
set -euo pipefail

STATE=$(realpath -m "${1:-${RLEF_SLURM_STATE:-/tmp/rlef-slurm}}")
NODES=${NODES:-2}
GPUS=8  # stand-in GPUs a node: a GPU node's shape, so the real sbatch scripts can run here
# Each node claims at least 16 CPUs (SlurmdParameters=config_overrides) so that a GPU node's
# shape (8 tasks a node) can be scheduled; tasks then share the real cores. Each also claims
# the machine's memory: the nodes share it, as they share the cores.
CPUS=$(( $(nproc) > 16 ? $(nproc) : 16 ))
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
HOSTS_BEGIN="# >>> rlef-hpc local Slurm (slurm/local/up.sh; down.sh removes) >>>"
HOSTS_END="# <<< rlef-hpc local Slurm <<<"

die() { echo "slurm/local/up.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (it starts munged, MariaDB and the Slurm daemons)"
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "NODES=$NODES: a number of nodes, 1 to 99"

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
node_names() { local k; for ((k = 1; k <= $1; k++)); do echo "node$k"; done; }
if running slurmctld && [ -f "$STATE/env" ]; then
  up=$(cat "$STATE/nodes" 2>/dev/null || echo 1)
  [ "$up" = "$NODES" ] || die "up already with $up node(s), not $NODES: slurm/local/down.sh first"
  all=1
  for node in $(node_names "$NODES"); do running "slurmd-$node" || all=0; done
  [ "$all" = 1 ] && { echo "already up ($NODES nodes): source $STATE/env"; exit 0; }
fi

missing=()
for cmd in slurmctld slurmd slurmdbd sbatch munged mariadbd; do
  command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Slurm, munge and MariaDB (missing: ${missing[*]})"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurmdbd slurm-client munge mariadb-server >/dev/null
fi

mkdir -p "$STATE"/{spool/ctld,spool/d,log,munge,mysql,run}
chmod 711 "$STATE/munge"
cd "$STATE"

# --- node names: node K is 127.0.2.K ----------------------------------------------------------
# Every address in 127.0.0.0/8 is loopback, so each node gets one of its own: a job's first
# node (the rendezvous, rlef_hpc/dist_env.py) is then a real name with its own address. The
# block between the markers is ours: rewritten here, removed by down.sh. Written in place
# (cat >), not replaced: /etc/hosts may be bind-mounted into a container.
hosts=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0==b{skip=1} !skip{print} $0==e{skip=0}' /etc/hosts)
{
  echo "$hosts"
  echo "$HOSTS_BEGIN"
  for ((k = 1; k <= NODES; k++)); do echo "127.0.2.$k node$k"; done
  echo "$HOSTS_END"
} > hosts.new
cat hosts.new > /etc/hosts && rm hosts.new
for node in $(node_names "$NODES"); do
  getent hosts "$node" >/dev/null || die "$node does not resolve after writing /etc/hosts"
done

# --- munge: our own key and socket -------------------------------------------------------
if [ ! -f munge/munge.key ]; then
  dd if=/dev/urandom of=munge/munge.key bs=1024 count=1 status=none
fi
chmod 400 munge/munge.key  # munged runs as root here, and owns its key and socket
# Slurm 22.05 reaches munge through the default socket on some paths (slurmctld -> slurmdbd)
# whatever AuthInfo says, so our munged listens there, with our own key.
SOCKET=/run/munge/munge.socket.2
if ! running munged; then
  if [ -S "$SOCKET" ] && munge -n --socket="$SOCKET" >/dev/null 2>&1; then
    die "another munged already serves $SOCKET; stop it first (this cluster needs its own key)"
  fi
  mkdir -p /run/munge && chmod 711 /run/munge
  /usr/sbin/munged --key-file="$STATE/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munge.seed" --force
fi

# --- MariaDB and slurmdbd --------------------------------------------------------------------
DB_SOCKET="$STATE/run/mysqld.sock"
if ! running mariadbd; then
  if [ ! -d mysql/mysql ]; then
    mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=normal >/dev/null
  fi
  setsid /usr/sbin/mariadbd --user=root --datadir="$STATE/mysql" --socket="$DB_SOCKET" \
    --bind-address=127.0.0.1 --port=3306 --pid-file="$STATE/mariadbd.pid" \
    --log-error="$STATE/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  # The socket file can exist before the server listens on it (CI once got "connection
  # refused" 3 s in): wait until a client is actually answered, not for the file.
  for _ in $(seq 300); do
    mariadb-admin --socket="$DB_SOCKET" -uroot ping >/dev/null 2>&1 && break; sleep 0.1
  done
  mariadb-admin --socket="$DB_SOCKET" -uroot ping >/dev/null 2>&1 \
    || die "MariaDB did not start: see $STATE/log/mariadb.log"
  mariadb --socket="$DB_SOCKET" -uroot -e \
    "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
fi

AUTH="AuthInfo=socket=$SOCKET,cred_expire=10"
cat > slurmdbd.conf <<CONF
AuthType=auth/munge
$AUTH
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
StoragePort=3306
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
CONF
chmod 600 slurmdbd.conf

# One NodeName line per node. slurmd listens on every address of the machine, so the nodes
# cannot share a port: node K listens on 6820+K (6817 is slurmctld's, 6819 slurmdbd's), its
# spool directory, PID file and log named after it (%n: the name given to `slurmd -N`).
node_lines=""
for ((k = 1; k <= NODES; k++)); do
  node_lines+="NodeName=node$k NodeHostname=node$k NodeAddr=127.0.2.$k Port=$((6820 + k))"
  node_lines+=" CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN"$'\n'
done
cat > slurm.conf <<CONF
ClusterName=rlef-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
$AUTH
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldPort=6817
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=2
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
JobRequeue=1
FirstJobId=$(( $(date +%s) % 1000000 + 1000 ))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
KillWait=10
MinJobAge=300
GresTypes=gpu
${node_lines}PartitionName=local Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP
CONF
# Stand-in GPUs (character devices like /dev/null), eight a node, each node its own: jobs
# asking for --gpus-per-node are scheduled and get CUDA_VISIBLE_DEVICES as on a GPU node, so
# the GPU sbatch scripts run here with a stand-in Python, or `sbatch --test-only`.
: > gres.conf
for node in $(node_names "$NODES"); do
  mkdir -p "dev/$node"
  for ((i = 0; i < GPUS; i++)); do  # plain files where a container forbids mknod
    [ -e "dev/$node/gpu$i" ] || mknod "dev/$node/gpu$i" c 1 3 2>/dev/null || : > "dev/$node/gpu$i"
  done
  echo "NodeName=$node Name=gpu File=$STATE/dev/$node/gpu[0-$((GPUS - 1))]" >> gres.conf
  mkdir -p "spool/d/$node"
done
export SLURM_CONF="$STATE/slurm.conf"

running slurmdbd || /usr/sbin/slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
for _ in $(seq 300); do (echo > /dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.1; done
(echo > /dev/tcp/127.0.0.1/6819) 2>/dev/null || die "slurmdbd did not start: see $STATE/log/slurmdbd.log"
# A fresh controller starts with no jobs (-c): a previous cluster's state (a run killed with
# its jobs still queued) would otherwise be recovered, its jobs holding the nodes. The nodes'
# spool goes with it, and their stale locks (-c).
if ! running slurmctld; then
  /usr/sbin/slurmctld -c -f "$SLURM_CONF"
fi
for node in $(node_names "$NODES"); do
  if ! running "slurmd-$node"; then
    rm -rf "spool/d/$node" && mkdir -p "spool/d/$node"
    /usr/sbin/slurmd -c -f "$SLURM_CONF" -N "$node"
  fi
done

idle=0
for _ in $(seq 300); do
  idle=$(sinfo -h -N -o "%N %T" 2>/dev/null | awk '$2 == "idle"' | sort -u | wc -l || true)
  [ "$idle" -ge "$NODES" ] && break
  sleep 0.1
done
[ "$idle" -ge "$NODES" ] || die "$idle of $NODES nodes idle: $(sinfo -h -N -o '%N=%T' 2>&1 | sort -u | tr '\n' ' ')see $STATE/log/"
echo "$NODES" > nodes
echo "export SLURM_CONF=$SLURM_CONF" > env
echo "up: source $STATE/env  ($NODES node(s) $(sinfo -h -o %N), each $CPUS CPUs, $GPUS stand-in GPUs, ${MEM_MB} MB)"
