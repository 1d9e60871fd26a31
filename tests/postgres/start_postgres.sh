#!/usr/bin/env bash
# Install (Debian `postgresql`) and start a local PostgreSQL for the sweep-queue tests and benchmarks:
# its own cluster in $PG_DIR, listening on 127.0.0.1:$PG_PORT only, with a role and database `ablate`.
# Idempotent: installs only what is missing, initialises the cluster once, starts it only if its
# postmaster is not running. Prints the SQLAlchemy URL as the last line of stdout (logs go to stderr)
# and writes it to $PG_DIR/url; the postmaster's PID is in $PG_DIR/postgres.pid (stop_postgres.sh).
#
# Env knobs:
#   ABLATE_PG_DIR=/var/tmp/ablate-postgres   cluster dir (data/, log, url, pid)
#   ABLATE_PG_PORT=55432
#   ABLATE_PG_MAX_CONNECTIONS=300   Debian's default (100) cannot serve 256 sweep workers, each of
#                                   which holds one connection (see README, storage)
set -euo pipefail

PG_DIR=${ABLATE_PG_DIR:-/var/tmp/ablate-postgres}
PG_PORT=${ABLATE_PG_PORT:-55432}
MAX_CONN=${ABLATE_PG_MAX_CONNECTIONS:-300}
DB=ablate
DB_USER=ablate
DB_PASS=ablate  # a throwaway local test cluster bound to 127.0.0.1
T_START=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T_START) / 1000000 )); printf '[start_postgres %d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*" >&2; }
die() { echo "start_postgres: ERROR: $*" >&2; exit 1; }
running() { [ -d "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# ---------------------------------------------------------------- 1. packages
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "postgresql is not installed and installing it needs root"
  log "apt-get install postgresql"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  log "packages installed"
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

# the cluster belongs to an unprivileged user: postgres refuses to run as root
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "no 'postgres' user (the Debian package creates it)"
  as_owner() { runuser -u postgres -- "$@"; }
  OWNER=postgres
else
  as_owner() { "$@"; }
  OWNER=$(id -un)
fi
URL="postgresql+psycopg://$DB_USER:$DB_PASS@127.0.0.1:$PG_PORT/$DB"
mkdir -p "$PG_DIR"
chown "$OWNER" "$PG_DIR"
PIDFILE=$PG_DIR/postgres.pid

# ---------------------------------------------------------------- 2. already running?
if [ -s "$PIDFILE" ] && running "$(cat "$PIDFILE")" \
   && as_owner "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
  log "already running (pid $(cat "$PIDFILE"))"
  echo "$URL"
  exit 0
fi

# ---------------------------------------------------------------- 3. cluster
if [ ! -s "$PG_DIR/data/PG_VERSION" ]; then
  log "initdb $PG_DIR/data"
  as_owner "$BIN/initdb" -D "$PG_DIR/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >/dev/null
  cat >> "$PG_DIR/data/postgresql.conf" <<CONF
# ablate test cluster (tests/postgres/start_postgres.sh)
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = $MAX_CONN
shared_buffers = 128MB
fsync = off               # a throwaway test cluster: durability is not what the tests measure
synchronous_commit = off
full_page_writes = off
CONF
fi

# ---------------------------------------------------------------- 4. start
log "starting postgres on 127.0.0.1:$PG_PORT"
as_owner "$BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 start >/dev/null \
  || { tail -20 "$PG_DIR/postgres.log" >&2; die "postgres did not start (log: $PG_DIR/postgres.log)"; }
head -1 "$PG_DIR/data/postmaster.pid" > "$PIDFILE"

# ---------------------------------------------------------------- 5. role and database
psql_su() { as_owner "$BIN/psql" -X -q -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
if [ -z "$(psql_su -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" ]; then
  psql_su -c "CREATE ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASS'"
fi
if [ -z "$(psql_su -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]; then
  psql_su -c "CREATE DATABASE $DB OWNER $DB_USER"
fi
echo "$URL" > "$PG_DIR/url"
log "ready: pid $(cat "$PIDFILE"), max_connections $MAX_CONN"
echo "$URL"
