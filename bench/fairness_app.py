"""The apps the fairness benchmark runs: the same task with and without the library.

Importable by worker subprocesses, so it is configured from environment variables:

* ``BENCH_BROKER_URL``: the Redis broker (and nothing else: there are no results);
* ``BENCH_REDIS_URL``: the Redis database the tasks write what they observed into
  (their finish times, and how many of them ran at once per tenant);
* ``BENCH_FAIR=1``: ``TENANT_JOBS_FAIR_DISPATCH`` on;
* ``BENCH_TENANTS``: how many tenants (``t000``, ``t001``, ...; default 21).

``create_app()`` is the app with flask-tenant-jobs (``flask --app
bench.fairness_app:create_app() tenant-jobs worker``); ``plain`` is a Celery app
without it (``celery -A bench.fairness_app:plain worker``), the FIFO baseline. Every
task records its label and the time it finished (``time.time()``) in the list
:data:`FINISHED`; the tasks of :func:`observe` also count how many of them run at
once per tenant, and keep the highest count seen.
"""

from __future__ import annotations

import os
import time
import typing as t

import redis
from celery import Celery
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs, current_tenant, tenant_task

from . import CORE_SETTINGS

db = SQLAlchemy()
tenant_jobs = TenantJobs()

QUEUE = "bench-fairness"
#: Redis list of ``"label finished_at"`` strings, one per finished task.
FINISHED = "bench-fairness:finished"
#: Redis hash: tenant -> tasks of :func:`observe` running now / the most seen at once.
RUNNING = "bench-fairness:running"
PEAK = "bench-fairness:peak"
#: ``tenant_concurrency`` of the capped tasks.
CAP = 2
#: A rate no run reaches: what checking a rate limit costs when it never holds back.
UNREACHED_RATE = "100000/s"

# Count one more running task of a tenant and keep the highest count: atomic in Redis.
_ENTER = """
local now = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local peak = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if now > peak then redis.call('HSET', KEYS[2], ARGV[1], now) end
return now
"""

_client: redis.Redis | None = None
_client_pid = 0


def tenant_name(index: int) -> str:
    """The name of the bench's tenant number ``index``."""
    return f"t{index:03d}"


def records() -> redis.Redis:
    """This process's client of ``BENCH_REDIS_URL`` (made again after a fork)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"))
        _client_pid = os.getpid()
    return _client


def finish(label: str, seconds: float) -> None:
    """The body every benchmark task shares: work ``seconds`` (waiting, like I/O), record."""
    if seconds:
        time.sleep(seconds)
    records().rpush(FINISHED, f"{label} {time.time():.6f}")


def observe(tenant: str, label: str, seconds: float) -> None:
    """:func:`finish`, counting the tasks of ``tenant`` that run at the same time."""
    client = records()
    client.eval(_ENTER, 2, RUNNING, PEAK, tenant)
    try:
        finish(label, seconds)
    finally:
        client.hincrby(RUNNING, tenant, -1)


@tenant_task(name="bench.fairness_app.work", ignore_result=True)
def work(label: str, seconds: float = 0.0) -> None:
    """A tenant task that works ``seconds``."""
    finish(label, seconds)


@tenant_task(name="bench.fairness_app.capped", ignore_result=True, tenant_concurrency=CAP)
def capped(label: str, seconds: float = 0.0) -> None:
    """:func:`work` with at most :data:`CAP` running at once per tenant."""
    observe(t.cast(str, current_tenant()), label, seconds)


@tenant_task(name="bench.fairness_app.uncapped", ignore_result=True)
def uncapped(label: str, seconds: float = 0.0) -> None:
    """:func:`capped` without the cap."""
    observe(t.cast(str, current_tenant()), label, seconds)


@tenant_task(name="bench.fairness_app.rated", ignore_result=True,
             tenant_rate_limit=UNREACHED_RATE)
def rated(label: str, seconds: float = 0.0) -> None:
    """:func:`work` with a per-tenant rate limit it never reaches."""
    finish(label, seconds)


@tenant_task(name="bench.fairness_app.wide", ignore_result=True, tenant_concurrency=100_000)
def wide(label: str, seconds: float = 0.0) -> None:
    """:func:`work` with a per-tenant cap no run reaches: what taking a slot costs."""
    finish(label, seconds)


def celery_config(broker_url: str) -> dict[str, t.Any]:
    """The Celery settings both apps share."""
    return {
        "broker_url": broker_url,
        "task_default_queue": QUEUE,
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }


def broker_url() -> str:
    return os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10")


def create_app(fair: bool | None = None, tenants: int | None = None) -> Flask:
    """The bench app with flask-tenant-jobs; each argument defaults to its variable."""
    if fair is None:
        fair = os.environ.get("BENCH_FAIR") == "1"
    count = tenants or int(os.environ.get("BENCH_TENANTS", "21"))
    app = Flask(__name__)
    app.config.update(
        CORE_SETTINGS,
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=[tenant_name(i) for i in range(count)],
        CELERY=celery_config(broker_url()),
    )
    if fair:
        app.config["TENANT_JOBS_FAIR_DISPATCH"] = True
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app


#: The baseline: plain Celery, FIFO, no flask-tenant-jobs (the tenant is only an argument).
plain = Celery("bench_fairness_plain", set_as_current=False)
plain.conf.update(celery_config(broker_url()))


@plain.task(name="bench.fairness_app.plain_work")
def plain_work(label: str, seconds: float = 0.0) -> None:
    """:func:`work` of a plain Celery app."""
    finish(label, seconds)
