#!/usr/bin/env bash
# Stop the PostgreSQL started by start_postgres.sh, by the PID in its pid file (SIGINT: PostgreSQL's
# "fast" shutdown, which ends the open sessions; SIGKILL after 30 s). The cluster dir is kept.
set -uo pipefail

PG_DIR=${ABLATE_PG_DIR:-/var/tmp/ablate-postgres}
PIDFILE=$PG_DIR/postgres.pid
running() { [ -d "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

[ -s "$PIDFILE" ] || { echo "stop_postgres: no pid file $PIDFILE"; exit 0; }
pid=$(cat "$PIDFILE")
if ! running "$pid" || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != postgres ]; then
  echo "stop_postgres: pid $pid not running (stale pid file)"; rm -f "$PIDFILE"; exit 0
fi
t0=$(date +%s%N)
kill -INT "$pid"
for _ in $(seq 300); do running "$pid" || break; sleep 0.1; done
if running "$pid"; then echo "stop_postgres: pid $pid ignored SIGINT, SIGKILL"; kill -KILL "$pid"; fi
rm -f "$PIDFILE"
echo "stop_postgres: stopped postgres (pid $pid) in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
