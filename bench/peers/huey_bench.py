"""huey peer benchmark.

  python huey_bench.py e2e redis|sqlite   -> huey_<storage>_e2e: N jobs/s
  python huey_bench.py latency redis      -> huey_redis_submit_to_start_p50/p99/p99.9

Worker setup: 4 worker processes, as 4 separate `huey_consumer -w 1 -k
thread` processes (each runs its one worker thread plus its scheduler loop),
unless PEERS_HUEY_LAYOUT=process, which starts one `huey_consumer -w 4 -k
process` (a scheduler process plus 4 forked workers) instead. Both were
measured on the 2-core machine with 30,000 jobs on Redis, A/B/A/B: 4
consumers gave 5,464 and 4,676 jobs/s, one 4-process consumer 4,153 and
4,475 (and 2,250 vs 1,673 on SQLite), so the default is 4 consumers.
"""
import os
import sys
import time

import common
from common import log, emit

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = 4


def consumer_argv(workers, kind):
    argv = [os.path.join(os.path.dirname(sys.executable), "huey_consumer"),
            "huey_app.huey", "-w", str(workers), "-k", kind,
            "-n",   # no periodic tasks to enqueue
            "-C",   # no worker health check thread
            "-q"]
    if os.environ["PEERS_HUEY_STORAGE"] == "sqlite":
        # SQLite has no blocking dequeue: a worker that finds the queue empty
        # sleeps `delay`, growing by `backoff` up to `max-delay` (defaults:
        # 0.1 s, x1.15, 10 s). Keep the idle polling short so that a worker
        # never sits out the run asleep; this only ever helps huey.
        argv += ["-d", "0.001", "-m", "0.01"]
    return argv


def start_workers(children, storage):
    env = dict(os.environ, PEERS_HUEY_STORAGE=storage,
               PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    layout = os.environ.get("PEERS_HUEY_LAYOUT", "consumers")
    if layout == "process":
        children.start("huey-%s-consumer" % storage,
                       consumer_argv(WORKERS, "process"), env=env, cwd=HERE)
    elif layout == "consumers":
        for i in range(WORKERS):
            children.start("huey-%s-consumer-%d" % (storage, i),
                           consumer_argv(1, "thread"), env=env, cwd=HERE)
    else:
        raise SystemExit("PEERS_HUEY_LAYOUT must be process or consumers")


def warm_up(children, task, n=200):
    """Run n tasks through the running workers so that every worker process
    has imported everything and holds its connections before timing."""
    base = common.completed()
    for _ in range(n):
        task()
    common.wait_completed(base + n, timeout=60)
    children.check_alive()


def main():
    mode, storage = sys.argv[1], sys.argv[2]
    os.environ["PEERS_HUEY_STORAGE"] = storage
    common.install_signal_handlers()
    if storage == "sqlite":  # a fresh database file for every run
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(os.path.join(common.RUN_DIR, "huey.db" + suffix))
            except FileNotFoundError:
                pass
    import huey_app  # after PEERS_HUEY_STORAGE is set and the file removed

    huey_app.huey.flush()  # empty queue, schedule and results
    if storage == "redis":
        common.redis_client().delete(common.LATENCY_KEY)

    with common.Children() as children:
        start_workers(children, storage)
        if mode == "e2e":
            warm_up(children, huey_app.noop)
            n = int(os.environ.get("PEERS_JOBS", "100000"))
            base = common.completed()
            noop = huey_app.noop
            log("huey %s: submitting %d no-op tasks" % (storage, n))
            t0 = time.perf_counter()
            # One client process, huey's ordinary API: calling a task
            # enqueues it (one LPUSH, or one INSERT+commit for SQLite).
            # huey has no batch enqueue.
            for _ in range(n):
                noop()
            t_sub = time.perf_counter()
            t1 = common.wait_completed(base + n, timeout=max(300, n / 50))
            children.check_alive()
            log("huey %s: submitted in %.2fs (%.0f/s), all done after %.2fs"
                % (storage, t_sub - t0, n / (t_sub - t0), t1 - t0))
            emit("huey_%s_e2e" % storage, n / (t1 - t0), "jobs/s")
        elif mode == "latency":
            warm_up(children, lambda: huey_app.record_start(time.time()))
            r = common.redis_client()
            r.delete(common.LATENCY_KEY)
            rate = float(os.environ.get("PEERS_LATENCY_RATE", "200"))
            seconds = float(os.environ.get("PEERS_LATENCY_SECONDS", "20"))
            n = int(rate * seconds)
            base = common.completed()
            log("huey %s: open loop, %g jobs/s for %gs" % (storage, rate, seconds))
            # Open loop: job i is sent at t0 + i/rate whatever happened to
            # the previous ones; its submit time is time.time() just before
            # the enqueue call.
            t0 = time.monotonic()
            for i in range(n):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                huey_app.record_start(time.time())
            common.wait_completed(base + n, timeout=120)
            children.check_alive()
            samples = sorted(float(x) * 1000.0
                             for x in r.lrange(common.LATENCY_KEY, 0, -1))
            if len(samples) != n:
                raise RuntimeError("got %d latency samples, expected %d"
                                   % (len(samples), n))
            for p, label in ((50, "p50"), (99, "p99"), (99.9, "p99.9")):
                emit("huey_%s_submit_to_start_%s" % (storage, label),
                     common.percentile(samples, p), "ms")
        else:
            raise SystemExit("unknown mode %r" % mode)


if __name__ == "__main__":
    main()
