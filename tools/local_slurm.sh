#!/usr/bin/env bash
# A real one-node Slurm on this machine (Debian's slurm-wlm 22.05 + munge), for testing the
# launcher (slurm/pretrain_7b_patch.sh) and its signal/requeue paths with the real scheduler.
#
#   tools/local_slurm.sh up       # install (if absent), configure, start; waits for an idle node
#                                 # (exit 3: Slurm cannot be had here: not root, no apt-get, ...)
#   tools/local_slurm.sh status   # exit 0 when the daemons run and the node is usable
#   tools/local_slurm.sh down     # cancel every job, stop the daemons (by their pids)
#   export SLURM_CONF=/tmp/megapatch-slurm/slurm.conf   # then sbatch/squeue/scontrol work
#
# Root only (it starts munged, slurmctld and slurmd and may apt-get install the packages).
# Everything lives in LOCAL_SLURM_DIR (default /tmp/megapatch-slurm): slurm.conf, state,
# spool, logs, pid files; nothing is written under /etc. There is no systemd here: nothing
# starts by itself, and `up` is idempotent (it starts only what is not running).
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/megapatch-slurm}
CONF=$DIR/slurm.conf
RUN=/run/slurm          # slurmctld's pid file: a directory owned by the slurm user
MUNGE_RUN=/run/munge
HOST=$(hostname -s)
# The node offers more CPUs than the machine has cores (SlurmdParameters=config_overrides) so
# that several 2-task test jobs run at once: the tests exercise scheduling and signals, not
# speed, and a 2-core machine would otherwise run one job at a time (a requeued job already
# waits ~2 minutes before it may start again).
NODE_CPUS=${LOCAL_SLURM_CPUS:-16}

say() { echo "[local-slurm] $*"; }
die() { echo "[local-slurm] error: $*" >&2; exit 1; }
# Exit status 3: Slurm cannot be had on this machine (not root, no packages and no apt-get, or
# the install failed); tests skip on it. Any other failure exits 1.
unavailable() { echo "[local-slurm] unavailable: $*" >&2; exit 3; }

pid_alive() {  # pid_alive FILE: the pid in FILE is a running process
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {
    SLURM_CONF=$CONF timeout 10 sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1 || true
}

usable() {  # idle or running jobs; not down/drained
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null \
        || unavailable "slurm-wlm and munge are not installed and apt-get is absent"
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$DIR/apt.log" 2>&1 \
        || unavailable "apt-get update failed: $(tail -n 1 "$DIR/apt.log")"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$DIR/apt.log" 2>&1 \
        || unavailable "apt-get install slurm-wlm munge failed: $(tail -n 1 "$DIR/apt.log")"
}

write_conf() {
    local mem_mib
    mem_mib=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    chown slurm:slurm "$DIR/state" "$DIR/log"
    cat >"$CONF" <<EOF
# Written by tools/local_slurm.sh: a one-node Slurm for tests (no systemd, no cgroup delegation).
ClusterName=megapatch-local
SlurmctldHost=$HOST
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# The cgroup mount is not delegated here: track processes by their parent chain, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, one job would take all the memory of the node.
DefMemPerCPU=2048
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=30
# The daemons run at nice -10 so that a 2-core machine loaded by many trainers still answers
# RPCs (at nice 0 slurmd missed the 10 s default and slurmctld killed the jobs as "node not
# responding"); jobs take the priority of sbatch/srun (nice 0), not the daemons'.
PropagatePrioProcess=1
MessageTimeout=60
SlurmdTimeout=600
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST CPUs=$NODE_CPUS Sockets=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 \
    RealMemory=$mem_mib State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
    pid_alive "$MUNGE_RUN/munged.pid" && return 0
    mkdir -p "$MUNGE_RUN" && chown munge:munge "$MUNGE_RUN" && chmod 0755 "$MUNGE_RUN"
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge)"
    nice -n -10 runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_RUN/munged.pid" \
        || die "munged did not start"
}

start_slurm() {
    mkdir -p "$RUN" && chown slurm:slurm "$RUN"
    if ! pid_alive "$RUN/slurmctld.pid"; then
        # -c: start from a clean state (no jobs left from an earlier session)
        nice -n -10 slurmctld -c -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
    fi
    if ! pid_alive "$DIR/slurmd.pid"; then
        nice -n -10 slurmd -f "$CONF" || die "slurmd did not start (see $DIR/log/slurmd.log)"
    fi
}

wait_usable() {
    local i
    for i in $(seq 1 60); do
        usable && return 0
        if [ "$i" = 10 ]; then  # a node left down by an earlier session
            SLURM_CONF=$CONF scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    die "node $HOST is not usable after 30 s (state: '$(node_state)'; see $DIR/log/)"
}

stop_pid() {  # stop_pid NAME FILE: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 file=$2 pid i
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { say "stopped $name ($pid)"; rm -f "$file"; return 0; }
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    say "killed $name ($pid)"
    rm -f "$file"
}

cmd_up() {
    [ "$(id -u)" = 0 ] \
        || unavailable "root is needed to install and start munge and Slurm (uid $(id -u))"
    mkdir -p "$DIR"
    if pid_alive "$MUNGE_RUN/munged.pid" && pid_alive "$RUN/slurmctld.pid" \
        && pid_alive "$DIR/slurmd.pid" && usable; then
        say "already up: node $HOST $(node_state); export SLURM_CONF=$CONF"
        return 0
    fi
    install_packages
    pid_alive "$RUN/slurmctld.pid" || pid_alive "$DIR/slurmd.pid" || write_conf
    start_munged
    start_slurm
    wait_usable
    say "up: node $HOST $(node_state), $NODE_CPUS CPUs; export SLURM_CONF=$CONF"
}

cmd_down() {
    [ "$(id -u)" = 0 ] || die "root is needed to stop the daemons"
    local i
    if pid_alive "$RUN/slurmctld.pid" && [ -f "$CONF" ]; then
        # Jobs outlive slurmd (their slurmstepd are separate processes): cancel them first.
        if [ -n "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ]; then
            SLURM_CONF=$CONF scancel --full --state=PENDING 2>/dev/null || true
            SLURM_CONF=$CONF scancel --full 2>/dev/null || true
            for i in $(seq 1 90); do  # KillWait (30 s) and the epilog
                [ -z "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    stop_pid slurmd "$DIR/slurmd.pid"
    stop_pid slurmctld "$RUN/slurmctld.pid"
    stop_pid munged "$MUNGE_RUN/munged.pid"
    say "down"
}

cmd_status() {
    local name file ok=0
    for name in munged slurmctld slurmd; do
        case $name in
            munged) file=$MUNGE_RUN/munged.pid ;;
            slurmctld) file=$RUN/slurmctld.pid ;;
            slurmd) file=$DIR/slurmd.pid ;;
        esac
        if pid_alive "$file"; then
            say "$name running (pid $(cat "$file"))"
        else
            say "$name not running"
            ok=1
        fi
    done
    if [ "$ok" = 0 ] && usable; then
        say "node $HOST $(node_state); export SLURM_CONF=$CONF"
        return 0
    fi
    say "not usable (node state: '$(node_state)')"
    return 1
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
