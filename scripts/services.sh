#!/usr/bin/env bash
# Throwaway services for the test suite: one PostgreSQL cluster on 127.0.0.1, trust auth, no
# durability, for the store tests' PostgreSQL backend (`CAF_TEST_POSTGRES`).
#
#   eval "$(scripts/services.sh start)"   # idempotent; prints `export CAF_TEST_POSTGRES=…`
#   scripts/services.sh env               # the same line, for a cluster already started
#   scripts/services.sh stop              # stops the cluster and deletes its files
#   scripts/services.sh pause             # stops the server but keeps its data: `start` brings
#                                         # it back as it was (the outage tests use this)
#
# Only the export line goes to stdout (so `eval` sees nothing else); progress goes to stderr.
# Installs Debian's `postgresql` with apt-get when no PostgreSQL binaries are found. Settings:
# CAF_SERVICES_DIR (default /tmp/caf-services), CAF_PG_PORT (default 54329).
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

install_postgres() {
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    say "installing postgresql with apt-get"
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends postgresql >&2
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

running() {
    [ -f "$DATA/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

start() {
    if ! BIN=$(pg_bindir); then
        install_postgres
        BIN=$(pg_bindir) || { say "no initdb/pg_ctl after installing postgresql"; exit 1; }
    fi
    if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /bin/sh postgres
    fi
    mkdir -p "$BASE"
    [ "$(id -u)" -eq 0 ] && chown postgres "$BASE"
    # The server's working directory must be readable by its user (root's home is not).
    cd "$BASE"
    if running; then
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

stop() {
    BIN=$(pg_bindir) || exit 0
    cd /
    if running; then
        say "stopping postgresql on 127.0.0.1:$PORT"
        as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    fi
    # Only what start created, in case CAF_SERVICES_DIR names a directory with other files.
    rm -rf "$DATA" "$LOG" "$BASE/initdb.log"
    rmdir "$BASE" 2>/dev/null || true
}

# Stops the server (fast shutdown: open connections are cut, as in a real outage) and keeps
# the data directory, so that `start` restarts the same cluster with every table intact.
pause() {
    BIN=$(pg_bindir) || exit 0
    cd /
    if running; then
        say "pausing postgresql on 127.0.0.1:$PORT (data kept in $DATA)"
        as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    fi
}

case "${1:-}" in
start) start ;;
stop) stop ;;
pause) pause ;;
env)
    BIN=$(pg_bindir) || { say "postgresql is not installed"; exit 1; }
    running || { say "postgresql is not running (scripts/services.sh start)"; exit 1; }
    echo "export CAF_TEST_POSTGRES=$URL"
    ;;
*)
    echo "usage: $0 start|stop|pause|env" >&2
    exit 2
    ;;
esac
