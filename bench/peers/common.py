"""Shared helpers for the peer benchmarks (huey, celery).

Everything here writes logs to stderr; only `emit()` writes to stdout, one
`name: value unit` line per figure, which is all that `rota-bench compare`
reads.
"""
import math
import os
import signal
import subprocess
import sys
import time

# Set by run.sh.
PEERS_DIR = os.environ.get("PEERS_DIR", "/tmp/rota-peers")
RUN_DIR = os.environ.get("PEERS_RUN_DIR", os.path.join(PEERS_DIR, "run"))
LOG_DIR = os.environ.get("PEERS_LOG_DIR", os.path.join(PEERS_DIR, "logs"))
PID_DIR = os.path.join(RUN_DIR, "pids")
REDIS_PORT = int(os.environ.get("PEERS_REDIS_PORT", "6390"))
# Completion counter: every no-op task appends one byte to this file with a
# single O_APPEND write (atomic on a local file system), so the file size is
# the number of tasks completed, across all worker processes.
COUNTER_FILE = os.environ.get("PEERS_COUNTER_FILE",
                              os.path.join(RUN_DIR, "completed.count"))
LATENCY_KEY = "rota-peers:latency"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def emit(name, value, unit):
    """The only thing that goes to stdout."""
    if unit == "jobs/s":
        text = "%d" % round(value)
    else:
        text = "%.3f" % value
    print("%s: %s %s" % (name, text, unit), flush=True)


# --- completion counter (used inside tasks and by the driver) -------------

_counter_fd = None


def mark_completed():
    """Called at the end of every no-op task: one append(2) of one byte."""
    global _counter_fd
    if _counter_fd is None or _counter_pid != os.getpid():
        _open_counter()
    os.write(_counter_fd, b".")


_counter_pid = None


def _open_counter():
    global _counter_fd, _counter_pid
    _counter_fd = os.open(COUNTER_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                          0o644)
    _counter_pid = os.getpid()


def completed():
    try:
        return os.stat(COUNTER_FILE).st_size
    except FileNotFoundError:
        return 0


def wait_completed(target, timeout, poll=0.001):
    """Poll the counter until it reaches `target`; return the time it did
    (perf_counter), at most `poll` seconds late."""
    deadline = time.monotonic() + timeout
    while True:
        if completed() >= target:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise RuntimeError("timed out: %d of %d tasks completed after %ss"
                               % (completed(), target, timeout))
        time.sleep(poll)


# --- percentiles ----------------------------------------------------------

def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


# --- child processes: started in their own process group, killed by PID ----

class Children:
    """Starts worker processes each in a new session (so its forked pool
    children share its process group id = its PID), records each PID in
    PID_DIR so that run.sh's EXIT trap can kill them if this script dies
    hard, and stops them by that PID group on exit."""

    def __init__(self):
        self.procs = []
        os.makedirs(PID_DIR, exist_ok=True)

    def start(self, name, argv, env=None, cwd=None):
        logf = open(os.path.join(LOG_DIR, name + ".log"), "ab")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        logf.close()
        open(os.path.join(PID_DIR, str(proc.pid)), "w").close()
        self.procs.append(proc)
        log("started %s: pid %d: %s" % (name, proc.pid, " ".join(argv)))
        return proc

    def check_alive(self):
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError("worker pid %d exited early with %s (see %s)"
                                   % (p.pid, p.returncode, LOG_DIR))

    def stop_all(self, grace=10.0):
        for p in self.procs:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left (the leader or any pool child): SIGKILL the group.
        for p in self.procs:
            _killpg(p.pid, signal.SIGKILL)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                log("pid %d did not exit after SIGKILL" % p.pid)
            try:
                os.unlink(os.path.join(PID_DIR, str(p.pid)))
            except FileNotFoundError:
                pass
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()
        return False


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def install_signal_handlers():
    """Turn SIGTERM/SIGHUP into an exception so that `with Children()` blocks
    clean up (SIGINT already raises KeyboardInterrupt)."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def redis_client():
    import redis
    return redis.Redis(host="127.0.0.1", port=REDIS_PORT)
