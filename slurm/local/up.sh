#!/usr/bin/env bash
# A real single-node Slurm cluster on loopback, for tests and for trying the launch path on
# one machine: munge, MariaDB + slurmdbd (accounting: submitit needs job states), slurmctld
# and slurmd, each started by this script with a PID file under the state directory.
#
#   slurm/local/up.sh [STATE_DIR]        (default: /tmp/rlef-slurm; root only)
#   source STATE_DIR/env                 SLURM_CONF for sbatch, srun, squeue, scontrol
#   slurm/local/down.sh [STATE_DIR]      stops what up.sh started, nothing else
#
# Installs Debian's slurmctld, slurmd, slurmdbd, slurm-client, munge and mariadb-server when
# they are missing. Idempotent: a cluster already up is left as it is.
set -euo pipefail

STATE=$(realpath -m "${1:-${RLEF_SLURM_STATE:-/tmp/rlef-slurm}}")
# The node claims at least 16 CPUs (SlurmdParameters=config_overrides) so that a GPU node's
# shape (8 tasks a node) can be scheduled here; tasks then share the real cores.
CPUS=$(( $(nproc) > 16 ? $(nproc) : 16 ))
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

die() { echo "slurm/local/up.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (it starts munged, MariaDB and the Slurm daemons)"

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
if running slurmctld && running slurmd && [ -f "$STATE/env" ]; then
  echo "already up: source $STATE/env"; exit 0
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
  for _ in $(seq 100); do [ -S "$DB_SOCKET" ] && break; sleep 0.1; done
  [ -S "$DB_SOCKET" ] || die "MariaDB did not start: see $STATE/log/mariadb.log"
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

cat > slurm.conf <<CONF
ClusterName=rlef-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
$AUTH
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
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
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:8 State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
# Eight stand-in GPUs (character devices like /dev/null): jobs asking for --gpus-per-node
# are scheduled and get CUDA_VISIBLE_DEVICES as on a GPU node, so the GPU sbatch scripts can
# be checked here (sbatch --test-only) with only their node and CPU counts scaled down.
mkdir -p dev
for i in 0 1 2 3 4 5 6 7; do  # plain files where a container forbids mknod
  [ -e dev/gpu$i ] || mknod dev/gpu$i c 1 3 2>/dev/null || : > dev/gpu$i
done
echo "NodeName=localhost Name=gpu File=$STATE/dev/gpu[0-7]" > gres.conf
export SLURM_CONF="$STATE/slurm.conf"

running slurmdbd || /usr/sbin/slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
for _ in $(seq 300); do (echo > /dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.1; done
(echo > /dev/tcp/127.0.0.1/6819) 2>/dev/null || die "slurmdbd did not start: see $STATE/log/slurmdbd.log"
running slurmctld || /usr/sbin/slurmctld -f "$SLURM_CONF"
running slurmd || /usr/sbin/slurmd -f "$SLURM_CONF" -N localhost

state=""
for _ in $(seq 300); do
  state=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
  [ "$state" = idle ] && break
  sleep 0.1
done
[ "$state" = idle ] || die "the node is '${state:-unreachable}', not idle: see $STATE/log/"
echo "export SLURM_CONF=$SLURM_CONF" > env
echo "up: source $STATE/env  ($CPUS CPUs, ${MEM_MB} MB)"
