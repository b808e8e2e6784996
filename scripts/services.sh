#!/usr/bin/env bash
# Throwaway services for the test suite, on this machine only:
#   - one PostgreSQL cluster on 127.0.0.1, trust auth, no durability, for the store tests'
#     PostgreSQL backend (`CAF_TEST_POSTGRES`);
#   - a single-node Slurm (munged, slurmctld, slurmd; no accounting daemon) for `caf submit
#     --slurm` (`CAF_TEST_SLURM`, and `SLURM_CONF` for sbatch/squeue/scontrol).
#
#   eval "$(scripts/services.sh start)"   # idempotent; prints the export lines
#   scripts/services.sh env               # the same lines, for services already started
#   scripts/services.sh stop              # stops them and deletes their files
#   scripts/services.sh start postgres    # (or slurm) only one of them; the same for env/stop
#   scripts/services.sh pause             # stops PostgreSQL but keeps its data: `start` brings
#                                         # it back as it was (the outage tests use this)
#
# Only export lines go to stdout (so `eval` sees nothing else); progress goes to stderr.
# Installs Debian's `postgresql`, and `slurmctld slurmd slurm-client munge` (Slurm 22.05 on
# bookworm), with apt-get when their binaries are missing. Settings: CAF_SERVICES_DIR (default
# /tmp/caf-services), CAF_PG_PORT (default 54329), CAF_SLURMCTLD_PORT (default 6817),
# CAF_SLURMD_PORT (default 6818), CAF_SLURM_CPUS (the node's CPUs, default 2).
set -euo pipefail

BASE=${CAF_SERVICES_DIR:-/tmp/caf-services}
PORT=${CAF_PG_PORT:-54329}
DATA=$BASE/pg
LOG=$BASE/pg.log
URL="postgres://postgres@127.0.0.1:$PORT/postgres"

say() { echo "services: $*" >&2; }

# The directory holding initdb and pg_ctl: PATH first, then Debian's versioned directories
# (the newest), where the `postgresql` package puts them without linking them into PATH.
pg_bindir() {
    local d
    if d=$(command -v pg_ctl 2>/dev/null) && [ -x "$(dirname "$d")/initdb" ]; then
        dirname "$d"
        return 0
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

apt_install() {
    say "installing $* with apt-get"
    $SUDO apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$@" >&2
}

# initdb and the server refuse to run as root: as root, run them as the `postgres` user.
as_pg() {
    if [ "$(id -u)" -ne 0 ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- "$@"
    else
        su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
}

pg_running() {
    [ -f "$DATA/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

pg_start() {
    if ! BIN=$(pg_bindir); then
        apt_install postgresql
        BIN=$(pg_bindir) || { say "no initdb/pg_ctl after installing postgresql"; exit 1; }
    fi
    if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /bin/sh postgres
    fi
    mkdir -p "$BASE"
    [ "$(id -u)" -eq 0 ] && chown postgres "$BASE"
    # The server's working directory must be readable by its user (root's home is not).
    cd "$BASE"
    if pg_running; then
        say "postgresql already running on 127.0.0.1:$PORT"
    else
        if [ ! -f "$DATA/PG_VERSION" ]; then
            rm -rf "$DATA"
            say "initdb $DATA"
            as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --no-sync -E UTF8 \
                --locale=C >"$BASE/initdb.log" 2>&1 || {
                cat "$BASE/initdb.log" >&2
                exit 1
            }
        fi
        # Tests only: no fsync. Sockets in $BASE, since /var/run/postgresql may not exist.
        # Enough connections for every test thread's pool plus a maintenance connection each.
        say "starting postgresql on 127.0.0.1:$PORT"
        as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 30 \
            -o "-c listen_addresses=127.0.0.1 -p $PORT -k $BASE -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
            start >/dev/null || {
            tail -n 30 "$LOG" >&2 || true
            exit 1
        }
    fi
    echo "export CAF_TEST_POSTGRES=$URL"
}

pg_stop() {
    BIN=$(pg_bindir) || return 0
    cd /
    if pg_running; then
        say "stopping postgresql on 127.0.0.1:$PORT"
        as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    fi
    # Only what start created, in case CAF_SERVICES_DIR names a directory with other files.
    rm -rf "$DATA" "$LOG" "$BASE/initdb.log"
}

# Stops the server (fast shutdown: open connections are cut, as in a real outage) and keeps
# the data directory, so that `start` restarts the same cluster with every table intact.
pg_pause() {
    BIN=$(pg_bindir) || return 0
    cd /
    if pg_running; then
        say "pausing postgresql on 127.0.0.1:$PORT (data kept in $DATA)"
        as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    fi
}

pg_env() {
    BIN=$(pg_bindir) || { say "postgresql is not installed"; exit 1; }
    pg_running || { say "postgresql is not running (scripts/services.sh start)"; exit 1; }
    echo "export CAF_TEST_POSTGRES=$URL"
}

# --- Slurm -----------------------------------------------------------------------------------
# One node (`caf1`, this machine at 127.0.0.1) in one partition (`debug`, the default). Its
# files live in $SLURM_DIR: slurm.conf, state, spool, logs and pid files. Daemons run as root
# (sudo when needed) under SlurmUser=root; jobs run as whoever submits them.

SLURM_DIR=$BASE/slurm
SLURM_CONF_FILE=$SLURM_DIR/slurm.conf
CTLD_PORT=${CAF_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${CAF_SLURMD_PORT:-6818}
SLURM_CPUS=${CAF_SLURM_CPUS:-2}
NODE=caf1
# Set when this script started munged, so stop leaves a munged it did not start alone.
MUNGE_MARK=$SLURM_DIR/started-munged

slurm_installed() {
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 &&
        command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1
}

munge_works() {
    command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

# No systemd here: munged's runtime directory is not created for it, and it must run as munge.
munge_start() {
    if munge_works; then
        return 0
    fi
    $SUDO mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    $SUDO chown munge:munge /run/munge /var/lib/munge /var/log/munge
    $SUDO chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        $SUDO sh -c 'umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null'
        $SUDO chown munge:munge /etc/munge/munge.key
    fi
    say "starting munged"
    if [ -n "$SUDO" ]; then
        sudo -u munge /usr/sbin/munged >&2
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged >&2
    else
        su munge -s /bin/sh -c /usr/sbin/munged >&2
    fi
    touch "$MUNGE_MARK"
    local i
    for i in $(seq 50); do
        munge_works && return 0
        sleep 0.1
    done
    say "munged does not answer (see /var/log/munge/munged.log)"
    exit 1
}

write_slurm_conf() {
    local host
    host=$(hostname -s)
    cat >"$SLURM_CONF_FILE.tmp" <<CONF
# Written by scripts/services.sh: a throwaway single-node Slurm for caf's tests.
ClusterName=caf
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again once its old credential expires (default: ~2 minutes).
AuthInfo=cred_expire=10
MailProg=/bin/true
# No cgroups and no systemd on these machines.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
MinJobAge=600
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/slurmctld.log
SlurmdLogFile=$SLURM_DIR/slurmd.log
NodeName=$NODE NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$SLURM_CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    mv "$SLURM_CONF_FILE.tmp" "$SLURM_CONF_FILE"
}

pid_alive() {
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {
    SLURM_CONF=$SLURM_CONF_FILE scontrol -o show node "$NODE" 2>/dev/null |
        sed -n 's/.* State=\([^ ]*\).*/\1/p'
}

slurm_start() {
    if ! slurm_installed; then
        apt_install slurmctld slurmd slurm-client munge
        slurm_installed || { say "no slurmctld/slurmd/sbatch/munged after installing"; exit 1; }
    fi
    $SUDO mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool"
    if [ -n "$SUDO" ]; then
        $SUDO chown "$(id -u)" "$SLURM_DIR"
    fi
    munge_start
    if pid_alive "$SLURM_DIR/slurmctld.pid" && pid_alive "$SLURM_DIR/slurmd.pid"; then
        say "slurm already running (slurmctld on 127.0.0.1:$CTLD_PORT)"
    else
        write_slurm_conf
        if ! pid_alive "$SLURM_DIR/slurmctld.pid"; then
            say "starting slurmctld on 127.0.0.1:$CTLD_PORT"
            $SUDO slurmctld -f "$SLURM_CONF_FILE" >&2 || {
                tail -n 30 "$SLURM_DIR/slurmctld.log" >&2 || true
                exit 1
            }
        fi
        if ! pid_alive "$SLURM_DIR/slurmd.pid"; then
            # The node is named caf1, not after this host: say which one it is.
            say "starting slurmd -N $NODE"
            $SUDO slurmd -f "$SLURM_CONF_FILE" -N "$NODE" >&2 || {
                tail -n 30 "$SLURM_DIR/slurmd.log" >&2 || true
                exit 1
            }
        fi
    fi
    local i state=""
    for i in $(seq 300); do
        state=$(node_state)
        case "$state" in
        IDLE* | MIXED* | ALLOCATED* | COMPLETING*) break ;;
        DOWN* | DRAIN* | FAIL*)
            # A node left down by an earlier run (e.g. a reboot with its state saved).
            SLURM_CONF=$SLURM_CONF_FILE scontrol update nodename="$NODE" state=resume >&2 || true
            ;;
        esac
        sleep 0.1
    done
    case "$state" in
    IDLE* | MIXED* | ALLOCATED* | COMPLETING*) ;;
    *)
        say "slurm node $NODE is not up (state '${state:-unknown}'); logs in $SLURM_DIR"
        tail -n 20 "$SLURM_DIR/slurmctld.log" "$SLURM_DIR/slurmd.log" >&2 || true
        exit 1
        ;;
    esac
    slurm_env
}

slurm_env() {
    pid_alive "$SLURM_DIR/slurmctld.pid" && pid_alive "$SLURM_DIR/slurmd.pid" || {
        say "slurm is not running (scripts/services.sh start)"
        exit 1
    }
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
    echo "export CAF_TEST_SLURM=$SLURM_CONF_FILE"
}

stop_pid() {
    local f=$1 i
    pid_alive "$f" || return 0
    # A daemon removes its pid file as it exits, possibly between these lines.
    $SUDO kill "$(cat "$f" 2>/dev/null)" 2>/dev/null || true
    for i in $(seq 100); do
        pid_alive "$f" || return 0
        sleep 0.1
    done
    $SUDO kill -9 "$(cat "$f" 2>/dev/null)" 2>/dev/null || true
}

slurm_stop() {
    [ -d "$SLURM_DIR" ] || return 0
    if pid_alive "$SLURM_DIR/slurmctld.pid" || pid_alive "$SLURM_DIR/slurmd.pid"; then
        say "stopping slurm"
        # Jobs first, so no worker outlives the cluster that started it.
        SLURM_CONF=$SLURM_CONF_FILE scancel --full --quiet --partition=debug 2>/dev/null || true
    fi
    stop_pid "$SLURM_DIR/slurmd.pid"
    stop_pid "$SLURM_DIR/slurmctld.pid"
    if [ -f "$MUNGE_MARK" ] && [ -f /run/munge/munged.pid ]; then
        stop_pid /run/munge/munged.pid
    fi
    $SUDO rm -rf "$SLURM_DIR"
}

# Which services a command is about: those named after it, or both.
WHICH=("${@:2}")
[ ${#WHICH[@]} -eq 0 ] && WHICH=(postgres slurm)
for w in "${WHICH[@]}"; do
    case "$w" in
    postgres | slurm) ;;
    *)
        echo "usage: $0 start|stop|env [postgres] [slurm] | pause" >&2
        exit 2
        ;;
    esac
done

case "${1:-}" in
pause) ( pg_pause ) ;;
start | env | stop)
    for w in "${WHICH[@]}"; do
        if [ "$w" = postgres ]; then
            ( "pg_$1" )
        else
            ( "slurm_$1" )
        fi
    done
    if [ "$1" = stop ]; then
        rmdir "$BASE" 2>/dev/null || true
    fi
    ;;
*)
    echo "usage: $0 start|stop|env [postgres] [slurm] | pause" >&2
    exit 2
    ;;
esac
