#!/usr/bin/env bash
# Peer benchmarks for `rota-bench compare`: huey (Redis and SQLite storage)
# and celery (Redis broker) running the same no-op workload as Rota's `e2e`
# and `latency`, with 4 worker processes each, on a private loopback Redis.
#
# stdout: only `name: value unit` lines. Everything else goes to stderr or to
# the log files under $PEERS_DIR/logs.
#
# Environment:
#   PEERS_DIR              throwaway dir (venv, Redis, SQLite, logs); default /tmp/rota-peers
#   PEERS_JOBS             huey e2e job count (default 100000)
#   PEERS_SECONDS          celery e2e counting window in s (default 60)
#   PEERS_LATENCY_SECONDS  open-loop latency run length in s (default 20)
#   PEERS_LATENCY_RATE     open-loop offered load in jobs/s (default 200)
#   PEERS_ONLY             space-separated subset of: huey_redis huey_sqlite
#                          celery_redis huey_redis_latency celery_redis_latency
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Keep the repo clean: no __pycache__ next to the scripts.
export PYTHONDONTWRITEBYTECODE=1
export PEERS_DIR="${PEERS_DIR:-/tmp/rota-peers}"
export PEERS_RUN_DIR="$PEERS_DIR/run"
export PEERS_LOG_DIR="$PEERS_DIR/logs"
export PEERS_JOBS="${PEERS_JOBS:-100000}"
export PEERS_SECONDS="${PEERS_SECONDS:-60}"
export PEERS_LATENCY_SECONDS="${PEERS_LATENCY_SECONDS:-20}"
export PEERS_LATENCY_RATE="${PEERS_LATENCY_RATE:-200}"
ONLY="${PEERS_ONLY:-huey_redis huey_sqlite celery_redis huey_redis_latency celery_redis_latency}"
VENV="$PEERS_DIR/venv"
PIDS="$PEERS_RUN_DIR/pids"

log() { echo "[peers] $*" >&2; }

mkdir -p "$PEERS_DIR" "$PEERS_LOG_DIR"
rm -rf "$PEERS_RUN_DIR"
mkdir -p "$PEERS_RUN_DIR" "$PIDS"

REDIS_PID=""
DRIVER_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    # A Python driver still running (we were interrupted): SIGTERM makes it
    # stop its workers and exit; give it a moment, then SIGKILL it.
    if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        kill -TERM "$DRIVER_PID" 2>/dev/null || true
        for _ in $(seq 150); do kill -0 "$DRIVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DRIVER_PID" 2>/dev/null || true
        wait "$DRIVER_PID" 2>/dev/null || true
    fi
    # Worker processes the Python drivers could not stop themselves (e.g.
    # the driver was SIGKILLed): each was started as the leader of its own
    # process group, so kill that group by its PID.
    local f pid
    for f in "$PIDS"/*; do
        [ -e "$f" ] || continue
        pid="$(basename "$f")"
        if kill -0 "$pid" 2>/dev/null; then
            log "killing leftover worker process group $pid"
            kill -TERM -- "-$pid" 2>/dev/null || true
            sleep 1
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
    if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
        kill -TERM "$REDIS_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- 1. install into the throwaway place -----------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
    log "installing Debian's redis-server"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >&2; then
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >&2
    fi
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import huey, celery, redis' 2>/dev/null; then
    log "creating venv $VENV with huey, celery[redis], redis"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install -q huey 'celery[redis]' redis >&2
fi
PY="$VENV/bin/python"
log "$("$PY" -c 'import huey, celery, redis; print("huey", huey.__version__, "celery", celery.__version__, "redis-py", redis.__version__)') / $(redis-server --version)"

# --- 2. a private Redis on loopback -----------------------------------------
REDIS_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
export PEERS_REDIS_PORT="$REDIS_PORT"
mkdir -p "$PEERS_RUN_DIR/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
    --daemonize no --dir "$PEERS_RUN_DIR/redis" \
    --logfile "$PEERS_LOG_DIR/redis.log" </dev/null >&2 &
REDIS_PID=$!
log "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT"
for i in $(seq 100); do
    if "$PY" -c "import redis, sys; redis.Redis(port=$REDIS_PORT).ping()" 2>/dev/null; then break; fi
    kill -0 "$REDIS_PID" 2>/dev/null || { log "redis-server exited, see $PEERS_LOG_DIR/redis.log"; exit 1; }
    [ "$i" -lt 100 ] || { log "redis-server did not answer"; exit 1; }
    sleep 0.1
done

# --- 3. the workloads, one after another ------------------------------------
# Each driver runs in the background and is waited for, so that a signal to
# this script runs the cleanup at once instead of after the driver ends.
run() {
    log "== $*"
    (cd "$HERE" && exec "$PY" "$@") &
    DRIVER_PID=$!
    wait "$DRIVER_PID"
    DRIVER_PID=""
}
for what in $ONLY; do
    case "$what" in
        huey_redis)           run huey_bench.py e2e redis ;;
        huey_sqlite)          run huey_bench.py e2e sqlite ;;
        celery_redis)         run celery_bench.py e2e ;;
        huey_redis_latency)   run huey_bench.py latency redis ;;
        celery_redis_latency) run celery_bench.py latency ;;
        *) log "unknown PEERS_ONLY entry: $what"; exit 2 ;;
    esac
done
