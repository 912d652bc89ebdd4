"""The app of the fair-dispatch tests (``tests/test_fair.py``), importable by workers.

Configured from environment variables so that ``flask --app
tests.fair_app:create_app() tenant-jobs worker`` subprocesses match the test side:
``FAIR_BROKER_URL`` (Redis; also where the tasks log what they do, unless
``FAIR_LOG_URL`` names another Redis), ``FAIR_QUEUE``
(Celery's default queue), ``FAIR_SLOT_TTL`` (``TENANT_JOBS_SLOT_TTL``),
``FAIR_VISIBILITY_TIMEOUT`` (default :data:`VISIBILITY_TIMEOUT`), ``FAIR_DURABLE=1``
(``task_acks_late`` and ``task_reject_on_worker_lost``). Every task appends a JSON
line to the Redis list :data:`LOG`: its tenant, its label, and when it started and
ended.
"""

from __future__ import annotations

import json
import os
import time
import typing as t

import redis
from celery import shared_task
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs, current_tenant, tenant_task

db = SQLAlchemy()
tenant_jobs = TenantJobs()

TENANTS = ["acme", "globex", "initech", "umbrella", "hooli"]
LOG = "fair-test:log"
VISIBILITY_TIMEOUT = 4


def _log(label: str, started: float, **extra: t.Any) -> None:
    line = {"tenant": current_tenant(), "label": label, "start": started, "end": time.time()}
    line.update(extra)
    _redis().rpush(LOG, json.dumps(line))


_clients: dict[int, redis.Redis] = {}


def log_url() -> str:
    """Where the tasks log: ``FAIR_LOG_URL``, else the broker."""
    return os.environ.get("FAIR_LOG_URL") or os.environ["FAIR_BROKER_URL"]


def _redis() -> redis.Redis:
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(log_url())
    return client


@tenant_task
def record(label: str, seconds: float = 0.0) -> str:
    """Log that it ran; take ``seconds``."""
    started = time.time()
    time.sleep(seconds)
    _log(label, started)
    return label


@tenant_task(tenant_concurrency=2)
def limited(label: str, seconds: float = 0.3) -> None:
    """At most two at once per tenant."""
    started = time.time()
    time.sleep(seconds)
    _log(label, started)


@tenant_task(tenant_rate_limit="4/s")
def rated(label: str) -> None:
    """At most four starts a second per tenant."""
    _log(label, time.time())


@tenant_task(tenant_concurrency=1, tenant_limit_key="billing-api")
def billing_a(label: str, seconds: float = 0.2) -> None:
    """Shares one slot per tenant with :func:`billing_b`."""
    started = time.time()
    time.sleep(seconds)
    _log(label, started)


@tenant_task(tenant_concurrency=1, tenant_limit_key="billing-api")
def billing_b(label: str, seconds: float = 0.2) -> None:
    """Shares one slot per tenant with :func:`billing_a`."""
    started = time.time()
    time.sleep(seconds)
    _log(label, started)


@tenant_task(bind=True, max_retries=2, default_retry_delay=0.2)
def flaky(self: t.Any, label: str) -> None:
    """Fails its first attempt, then succeeds."""
    started = time.time()
    if self.request.retries == 0:
        raise self.retry()
    _log(label, started, retries=self.request.retries)


@tenant_task
def sleepy(label: str, seconds: float) -> None:
    """A long task for the crash tests: logs ``started`` first, then its label."""
    started = time.time()
    _log("started:" + label, started)
    time.sleep(seconds)
    _log(label, started)


@tenant_task(tenant_concurrency=2)
def limited_sleepy(label: str, seconds: float) -> None:
    """:func:`sleepy` with at most two at once per tenant."""
    started = time.time()
    _log("started:" + label, started)
    time.sleep(seconds)
    _log(label, started)


@tenant_task
def total(values: list[t.Any], label: str) -> None:
    """A chord body."""
    _log(label, time.time(), count=len(values))


@shared_task
def plain(label: str) -> None:
    """A task of no tenant."""
    _log(label, time.time())


def create_app(**overrides: t.Any) -> Flask:
    app = Flask(__name__)
    broker = os.environ["FAIR_BROKER_URL"]
    celery: dict[str, t.Any] = {
        "broker_url": broker,
        "result_backend": broker,
        "task_default_queue": os.environ.get("FAIR_QUEUE", "fair-test"),
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {"visibility_timeout": float(os.environ.get(
                                         "FAIR_VISIBILITY_TIMEOUT", VISIBILITY_TIMEOUT)),
                                     "unacked_restore_interval": 1,
                                     "unacked_restore_throttle": 1},
        "beat_schedule": {
            "record-each-tenant": {"task": "tests.fair_app.record", "schedule": 1.0,
                                   "args": ("beat",)},
        },
    }  # fmt: skip
    if os.environ.get("FAIR_DURABLE") == "1":
        celery.update(task_acks_late=True, task_reject_on_worker_lost=True)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=TENANTS,
        TENANT_JOBS_FAIR_DISPATCH=True,
        TENANT_JOBS_SLOT_TTL=float(os.environ.get("FAIR_SLOT_TTL", "60")),
        CELERY=celery,
    )
    app.config.update(overrides)
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app
