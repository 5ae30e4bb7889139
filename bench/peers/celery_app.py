"""The celery application the worker loads (`celery -A celery_app worker`).

Broker: the loopback Redis that run.sh started. No result backend: results
are ignored (task_ignore_result), completion is counted by the task itself.
Everything else is celery's shipped default (json serializer, acks_late off,
prefetch multiplier 4, the prefork pool's default `fair` scheduling).
"""
import time

from celery import Celery

import common

app = Celery("rota_peers",
             broker="redis://127.0.0.1:%d/0" % common.REDIS_PORT)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task
def noop():
    """The no-op job: one append(2) to the completion counter file."""
    common.mark_completed()


_redis = None


@app.task
def record_start(submitted):
    """Latency probe: push (start - submit time) in seconds onto a Redis
    list first thing, then count the completion."""
    started = time.time()
    global _redis
    if _redis is None:
        _redis = common.redis_client()
    _redis.rpush(common.LATENCY_KEY, repr(started - submitted))
    common.mark_completed()
