#!/usr/bin/env bash
# Real Postgres and Redis on loopback for tests and local cluster-mode runs, from Debian's
# packages. Idempotent: installs what is missing, starts what is not running.
#
#   scripts/services.sh start           start the shared instances, print their URLs as KEY=VALUE
#   scripts/services.sh postgres NAME   start (or reuse) a private Postgres instance NAME
#   scripts/services.sh stop-postgres NAME / start-postgres NAME
#   scripts/services.sh minio NAME [HOST]  start (or reuse) a MinIO server NAME on HOST
#                                       (default 127.0.0.1), print its endpoint
#   scripts/services.sh stop            stop everything this script started
#
# MinIO (the S3-compatible server for backup tests) is built from its Go module once and cached
# under ~/.cache/semantis/minio/<version>/.
set -euo pipefail

# MinIO publishes no semver tags; this is the module's pseudo-version of a 2026-02 commit.
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
MINIO_USER=semantis
MINIO_PASSWORD=semantis-minio-secret

# shellcheck source=scripts/pids.sh
. "$(dirname "$0")/pids.sh"

root="${SEMANTIS_SERVICES_DIR:-/tmp/semantis-services}"
mkdir -p "$root"
chmod 755 "$root"

as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  return 1
}

install_missing() {
  local need=()
  pg_bin >/dev/null 2>&1 || need+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  if [ ${#need[@]} -gt 0 ]; then
    local sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    echo "installing ${need[*]} (Debian packages)" >&2
    $sudo_cmd apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  # Postgres refuses to run as root; Debian's package creates this user, a bare binary may not.
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home postgres
  fi
}

# A stable port per instance name, below the kernel's ephemeral range (32768-60999 by
# default): a client reconnecting to a stopped instance is never given the instance's port as
# its own source port (a self-connection that then holds the port against the restart).
port_of() {
  local sum
  sum=$(printf '%s' "$1" | cksum | cut -d' ' -f1)
  echo $(( 22000 + sum % 8000 ))
}

# Wait until process PID has exited (at most 30 s); kill -9 it after that.
wait_gone() {
  local pid="$1"
  for _ in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.05
  done
  kill -9 "$pid" 2>/dev/null || true
}

# An instance of an earlier port scheme (or a wedged one) still running from DIR's pidfile
# while nothing answers on PORT: stop it before starting on PORT with the same files. Only
# that instance: a stale pidfile's pid may since have been given to any other process.
stop_stray() {
  local pidfile="$1" dir="$2" pid
  pid=$(pid_ours "$pidfile" "$dir")
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait_gone "$pid"
  fi
  rm -f "$pidfile"
}

postgres_start() {
  local name="$1" bin dir port
  bin=$(pg_bin)
  dir="$root/pg-$name"
  port=$(port_of "pg-$name")
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir"
    as_postgres "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  # Running, but on another port (an earlier port scheme): restart it on this one.
  if as_postgres "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1 \
    && [ "$(sed -n 4p "$dir/postmaster.pid" 2>/dev/null)" != "$port" ]; then
    as_postgres "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
  fi
  if ! as_postgres "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    as_postgres "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
  fi
  echo "postgres://postgres@127.0.0.1:$port/postgres"
}

postgres_stop() {
  local name="$1" bin dir
  bin=$(pg_bin)
  dir="$root/pg-$name"
  [ -d "$dir" ] && as_postgres "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
}

redis_start() {
  local name="$1" dir port
  dir="$root/redis-$name"
  port=$(port_of "redis-$name")
  mkdir -p "$dir"
  if ! redis-cli -p "$port" ping >/dev/null 2>&1; then
    stop_stray "$dir/redis.pid" "$dir"
    # AOF with fsync on every write: an acknowledged write survives a crash.
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes \
      --appendonly yes --appendfsync always --save "" \
      --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" >/dev/null
  fi
  # Wait for PONG, not just an answer: while Redis replays its AOF it answers every command
  # with a LOADING error, and a FLUSHALL sent then would be refused.
  for _ in $(seq 1 600); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.05
  done
  [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] || { echo "Redis \`$name\` did not start: see $dir/redis.log" >&2; return 1; }
  echo "redis://127.0.0.1:$port"
}

redis_stop() {
  local port dir="$root/redis-$1" pid
  port=$(port_of "redis-$1")
  pid=$(pid_ours "$dir/redis.pid" "$dir")
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  # Gone, not just told: a restart right after must find the port and the files free.
  [ -n "$pid" ] && wait_gone "$pid"
  return 0
}

minio_bin() {
  local dir="${SEMANTIS_CACHE_DIR:-$HOME/.cache/semantis}/minio/$MINIO_VERSION"
  if [ ! -x "$dir/minio" ]; then
    command -v go >/dev/null 2>&1 || { echo "MinIO needs Go to build (go install)" >&2; return 1; }
    echo "building MinIO $MINIO_VERSION from its Go module (a few minutes, once)" >&2
    mkdir -p "$dir"
    GOBIN="$dir" GOFLAGS=-mod=mod go install "github.com/minio/minio@$MINIO_VERSION" >&2
  fi
  echo "$dir/minio"
}

minio_start() {
  # HOST: the address to listen on; the real node's pods reach the host at 10.244.0.1.
  local name="$1" host="${2:-127.0.0.1}" bin dir port
  bin=$(minio_bin)
  dir="$root/minio-$name"
  port=$(port_of "minio-$name")
  mkdir -p "$dir/data"
  if ! curl -fsS "http://$host:$port/minio/health/live" >/dev/null 2>&1; then
    stop_stray "$dir/minio.pid" "$dir"
    MINIO_ROOT_USER=$MINIO_USER MINIO_ROOT_PASSWORD=$MINIO_PASSWORD MINIO_BROWSER=off \
      setsid "$bin" server "$dir/data" --address "$host:$port" --quiet \
      >"$dir/minio.log" 2>&1 </dev/null &
    pid_save "$dir/minio.pid" $!
    for _ in $(seq 1 200); do
      curl -fsS "http://$host:$port/minio/health/live" >/dev/null 2>&1 && break
      sleep 0.1
    done
    curl -fsS "http://$host:$port/minio/health/live" >/dev/null \
      || { echo "MinIO did not start; see $dir/minio.log" >&2; return 1; }
  fi
  echo "SEMANTIS_TEST_S3_ENDPOINT=http://$host:$port"
  echo "AWS_ACCESS_KEY_ID=$MINIO_USER"
  echo "AWS_SECRET_ACCESS_KEY=$MINIO_PASSWORD"
}

minio_stop() {
  stop_stray "$root/minio-$1/minio.pid" "$root/minio-$1"
}

case "${1:-start}" in
  start)
    install_missing
    echo "SEMANTIS_TEST_POSTGRES_URL=$(postgres_start shared)"
    echo "SEMANTIS_TEST_REDIS_URL=$(redis_start shared)"
    ;;
  postgres|start-postgres) install_missing; postgres_start "$2" ;;
  stop-postgres) postgres_stop "$2" ;;
  redis|start-redis) install_missing; redis_start "$2" ;;
  stop-redis) redis_stop "$2" ;;
  minio|start-minio) minio_start "$2" "${3:-127.0.0.1}" ;;
  stop-minio) minio_stop "$2" ;;
  stop)
    for d in "$root"/pg-*; do [ -d "$d" ] && postgres_stop "${d##*/pg-}"; done
    for d in "$root"/redis-*; do [ -d "$d" ] && redis_stop "${d##*/redis-}"; done
    for d in "$root"/minio-*; do [ -d "$d" ] && minio_stop "${d##*/minio-}"; done
    ;;
  *) echo "usage: $0 start|postgres NAME|stop-postgres NAME|redis NAME|stop-redis NAME|minio NAME|stop-minio NAME|stop" >&2; exit 2 ;;
esac
