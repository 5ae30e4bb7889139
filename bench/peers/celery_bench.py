"""celery peer benchmark (Redis broker).

  python celery_bench.py e2e       -> celery_redis_e2e: N jobs/s
  python celery_bench.py latency   -> celery_redis_submit_to_start_p50/p99/p99.9

Worker setup: one `celery worker --pool prefork --concurrency 4`, i.e. one
consumer process that reads the broker and 4 forked pool processes that run
the tasks. Gossip, mingle and heartbeat (cluster chatter between workers,
none here) are turned off; they do not touch the task path.
"""
import os
import sys
import threading
import time

import common
from common import log, emit

HERE = os.path.dirname(os.path.abspath(__file__))
QUEUE = "celery"  # the default queue, a Redis list of that name


def start_worker(children):
    env = dict(os.environ,
               PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "celery", "-A", "celery_app", "worker",
            "--pool", "prefork", "--concurrency", "4",
            "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    children.start("celery-worker", argv, env=env, cwd=HERE)


def warm_up(children, send, n=200):
    base = common.completed()
    for _ in range(n):
        send()
    common.wait_completed(base + n, timeout=120)
    children.check_alive()


def producer(stop, r, high=5000):
    """Submit continuously with celery's ordinary API (`delay`, one LPUSH per
    task), pausing while the backlog is above `high` messages: the workers
    never run dry, and the producer does not take the CPU the workers need
    to pile up messages that nobody will run within the window."""
    from celery_app import noop
    while not stop.is_set():
        if r.llen(QUEUE) > high:
            time.sleep(0.002)
            continue
        for _ in range(500):
            noop.delay()


def main():
    mode = sys.argv[1]
    common.install_signal_handlers()
    r = common.redis_client()
    r.flushdb()
    import celery_app

    with common.Children() as children:
        start_worker(children)
        if mode == "e2e":
            warm_up(children, celery_app.noop.delay)
            seconds = float(os.environ.get("PEERS_SECONDS", "60"))
            stop = threading.Event()
            th = threading.Thread(target=producer, args=(stop, r), daemon=True)
            th.start()
            try:
                # Let the producer fill the queue, then count completions
                # over the window.
                time.sleep(2)
                children.check_alive()
                c0, t0 = common.completed(), time.perf_counter()
                log("celery: counting completions for %gs" % seconds)
                time.sleep(seconds)
                c1, t1 = common.completed(), time.perf_counter()
                children.check_alive()
            finally:
                stop.set()
                th.join(10)
            log("celery: %d completed in %.2fs, backlog %d"
                % (c1 - c0, t1 - t0, r.llen(QUEUE)))
            emit("celery_redis_e2e", (c1 - c0) / (t1 - t0), "jobs/s")
        elif mode == "latency":
            warm_up(children, lambda: celery_app.record_start.delay(time.time()))
            r.delete(common.LATENCY_KEY)
            rate = float(os.environ.get("PEERS_LATENCY_RATE", "200"))
            seconds = float(os.environ.get("PEERS_LATENCY_SECONDS", "20"))
            n = int(rate * seconds)
            base = common.completed()
            log("celery: open loop, %g jobs/s for %gs" % (rate, seconds))
            # Open loop: job i is sent at t0 + i/rate; its submit time is
            # time.time() just before the delay() call.
            t0 = time.monotonic()
            for i in range(n):
                d = t0 + i / rate - time.monotonic()
                if d > 0:
                    time.sleep(d)
                celery_app.record_start.delay(time.time())
            common.wait_completed(base + n, timeout=120)
            children.check_alive()
            samples = sorted(float(x) * 1000.0
                             for x in r.lrange(common.LATENCY_KEY, 0, -1))
            if len(samples) != n:
                raise RuntimeError("got %d latency samples, expected %d"
                                   % (len(samples), n))
            for p, label in ((50, "p50"), (99, "p99"), (99.9, "p99.9")):
                emit("celery_redis_submit_to_start_%s" % label,
                     common.percentile(samples, p), "ms")
        else:
            raise SystemExit("unknown mode %r" % mode)
    r.flushdb()


if __name__ == "__main__":
    main()
