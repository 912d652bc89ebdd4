"""The apps the job benchmarks run: a no-op tenant task, and the baseline's no-op task
of a plain Celery app without the library (``celery -A bench.jobs_app:plain worker``)."""

from __future__ import annotations

import os

from celery import Celery
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs, tenant_task

from . import CORE_SETTINGS

db = SQLAlchemy()
tenant_jobs = TenantJobs()


def tenant_name(index: int) -> str:
    """The name of the bench's tenant number ``index``."""
    return f"t{index:05d}"


@tenant_task(name="bench.jobs_app.tenant_noop")
def tenant_noop() -> None:
    """Does nothing, in a tenant."""


@tenant_task(name="bench.jobs_app.capped_noop", tenant_concurrency=2)
def capped_noop() -> None:
    """Does nothing, in a tenant, at most two at once per tenant."""


def celery_config(broker_url: str | None = None) -> dict[str, object]:
    """The Celery settings of both apps; the broker from ``BENCH_BROKER_URL`` by default."""
    broker = broker_url or os.environ.get("BENCH_BROKER_URL", "memory://")
    return {
        "broker_url": broker,
        "result_backend": broker.replace("memory://", "cache+memory://"),
        "task_ignore_result": False,
        "worker_prefetch_multiplier": 16,
    }


def plain_noop() -> None:
    """Does nothing: the baseline's task, in a plain Celery app."""


def plain_app(broker_url: str | None = None) -> Celery:
    """The baseline: a Celery app without flask-tenant-jobs, configured like the bench app,
    with :func:`plain_noop` as ``bench.jobs_app.plain_noop``."""
    app = Celery("bench_jobs_plain", set_as_current=False)
    app.conf.update(celery_config(broker_url))
    app.task(name="bench.jobs_app.plain_noop")(plain_noop)
    return app


#: The baseline's app of ``celery -A bench.jobs_app:plain worker``.
plain = plain_app()


#: The signing key of the bench's signing rows.
SIGNING_KEY = "bench-signing-key-0123456789abcdef"


def create_app(
    tenants: int = 10_000,
    broker_url: str | None = None,
    signing: bool = False,
    fair: bool = False,
) -> Flask:
    """The bench app with ``tenants`` tenants; the broker from ``BENCH_BROKER_URL``;
    ``signing``: tenant headers signed (``TENANT_JOBS_SIGNING_KEY``); ``fair``: fair
    dispatch on (``TENANT_JOBS_FAIR_DISPATCH``, Redis broker), which limits need."""
    app = Flask(__name__)
    app.config.update(
        CORE_SETTINGS,
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=[tenant_name(i) for i in range(tenants)],
        CELERY=celery_config(broker_url),
    )
    if signing:
        app.config["TENANT_JOBS_SIGNING_KEY"] = SIGNING_KEY
    if fair:
        app.config["TENANT_JOBS_FAIR_DISPATCH"] = True
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app
