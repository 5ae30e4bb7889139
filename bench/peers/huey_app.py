"""The huey application the consumers load (`huey_consumer huey_app.huey`).

The storage is chosen by PEERS_HUEY_STORAGE: `redis` (RedisHuey on the
loopback Redis that run.sh started) or `sqlite` (SqliteHuey on a file in the
throwaway directory; huey's defaults: WAL journal, and SQLite's default
synchronous=FULL, so every enqueue and every dequeue commit is fsynced).
"""
import os
import time

from huey import RedisHuey, SqliteHuey

import common

STORAGE = os.environ.get("PEERS_HUEY_STORAGE", "redis")

if STORAGE == "redis":
    # blocking=True (the default): workers wait on BRPOP, no polling.
    huey = RedisHuey("rota-peers", host="127.0.0.1", port=common.REDIS_PORT)
elif STORAGE == "sqlite":
    huey = SqliteHuey("rota-peers",
                      filename=os.path.join(common.RUN_DIR, "huey.db"))
else:
    raise SystemExit("PEERS_HUEY_STORAGE must be redis or sqlite")


@huey.task()
def noop():
    """The no-op job. Returns None, so huey stores no result; its only cost
    beyond huey's own is one append(2) to the completion counter file."""
    common.mark_completed()


_redis = None


@huey.task()
def record_start(submitted):
    """Latency probe: first thing at start, push (now - submit time) in
    seconds onto a Redis list, then count the completion."""
    started = time.time()
    global _redis
    if _redis is None:
        _redis = common.redis_client()
    _redis.rpush(common.LATENCY_KEY, repr(started - submitted))
    common.mark_completed()
