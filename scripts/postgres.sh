#!/usr/bin/env bash
# A local PostgreSQL for the Prefect server (tests, trials), from Debian's packages. It runs as
# the `postgres` user when started by root (PostgreSQL refuses to run as root), listens on
# 127.0.0.1 only, and keeps everything (data, socket, log) in DIR.
#
#   scripts/postgres.sh start  [--dir DIR] [--port PORT]   # prints `export` lines
#   scripts/postgres.sh stop   [--dir DIR]                 # stops the server, removes DIR
#   scripts/postgres.sh status [--dir DIR]
#
#   eval "$(scripts/postgres.sh start)"
#   prefect server start     # now on PostgreSQL (PREFECT_API_DATABASE_CONNECTION_URL)
#
# Defaults: DIR=${BATON_PG_DIR:-/tmp/baton-postgres}, PORT=${BATON_PG_PORT:-55432}; database,
# role and password ${BATON_PG_DB:-prefect}/${BATON_PG_USER:-prefect}/${BATON_PG_PASSWORD:-prefect}.
# The first start installs the `postgresql` package with apt-get (root), without Debian's default
# cluster. `start` on a DIR whose server runs already just prints the exports again.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }
say() { echo "postgres.sh: $*" >&2; }

cmd=${1:-}
[ $# -gt 0 ] && shift
DIR=${BATON_PG_DIR:-/tmp/baton-postgres}
PORT=${BATON_PG_PORT:-55432}
DB=${BATON_PG_DB:-prefect}
ROLE=${BATON_PG_USER:-prefect}
PASSWORD=${BATON_PG_PASSWORD:-prefect}
while [ $# -gt 0 ]; do
    case $1 in
        --dir) DIR=$2; shift 2 ;;
        --dir=*) DIR=${1#*=}; shift ;;
        --port) PORT=$2; shift 2 ;;
        --port=*) PORT=${1#*=}; shift ;;
        *) die "unknown argument: $1" ;;
    esac
done
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac
DIR=${DIR%/}
[ -n "$DIR" ] && [ "$DIR" != / ] || die "refusing DIR=/"
DATA=$DIR/data

pg_bin() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$found" ] && [ -x "$found/pg_ctl" ] && echo "$found"
}

install_postgres() {
    [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed; run as root once (apt-get install postgresql)"
    say "installing PostgreSQL from Debian's packages (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends postgresql-common >&2 \
        || { apt-get update >&2 && apt-get install -y --no-install-recommends postgresql-common >&2; }
    # No default cluster on port 5432: this script makes its own in DIR.
    if [ -f /etc/postgresql-common/createcluster.conf ]; then
        sed -i 's/^#\?\s*create_main_cluster.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
    fi
    apt-get install -y --no-install-recommends postgresql >&2
}

# Run a command as the server's owner: `postgres` when we are root, else ourselves.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

env_lines() {
    printf 'export PREFECT_API_DATABASE_CONNECTION_URL=%q\n' \
        "postgresql+asyncpg://$ROLE:$PASSWORD@127.0.0.1:$(cat "$DIR/port")/$DB"
}

running() { [ -n "${BIN:-}" ] && [ -d "$DATA" ] && as_owner "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1; }

BIN=$(pg_bin || true)

case $cmd in
start)
    if running; then
        env_lines
        exit 0
    fi
    [ -n "$BIN" ] || { install_postgres; BIN=$(pg_bin) || die "no pg_ctl after installing postgresql"; }
    if [ ! -s "$DATA/PG_VERSION" ]; then
        mkdir -p "$DIR"
        rm -rf "$DATA"
        [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
        as_owner test -w "$DIR" || die "$DIR: the postgres user cannot write there (a parent folder is private?)"
        printf '%s\n' "$PASSWORD" > "$DIR/pwfile"
        [ "$(id -u)" = 0 ] && chown postgres: "$DIR/pwfile"
        chmod 600 "$DIR/pwfile"
        # Local socket: trust for the owner; TCP: passwords (scram-sha-256).
        as_owner "$BIN/initdb" -D "$DATA" -U postgres --pwfile="$DIR/pwfile" --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
            || die "initdb failed: $(tail -n 20 "$DIR/initdb.log")"
        rm -f "$DIR/pwfile"
        fresh=1
    fi
    echo "$PORT" > "$DIR/port"
    [ "$(id -u)" = 0 ] && chown postgres: "$DIR/port"
    as_owner "$BIN/pg_ctl" start -D "$DATA" -w -t 60 -l "$DIR/postgres.log" \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR" >&2 \
        || die "pg_ctl start failed: $(tail -n 20 "$DIR/postgres.log" 2>/dev/null)"
    if [ -n "${fresh:-}" ]; then
        psql_() { as_owner "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
        psql_ -d postgres -c "CREATE ROLE \"$ROLE\" LOGIN PASSWORD '$PASSWORD'" >&2
        psql_ -d postgres -c "CREATE DATABASE \"$DB\" OWNER \"$ROLE\"" >&2
    fi
    say "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT, database $DB, data in $DATA"
    env_lines
    ;;
stop)
    if running; then
        as_owner "$BIN/pg_ctl" stop -D "$DATA" -m fast -w -t 60 >&2 || true
    fi
    rm -rf "$DIR"
    ;;
status)
    if running; then
        echo "PostgreSQL: running on 127.0.0.1:$(cat "$DIR/port"), data in $DATA"
        env_lines
    else
        echo "PostgreSQL: not running (dir $DIR)"
        exit 1
    fi
    ;;
*)
    die "usage: $0 start|stop|status [--dir DIR] [--port PORT]"
    ;;
esac
