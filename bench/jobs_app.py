"""The app the job benchmarks run: a no-op tenant task and a no-op plain task."""

from __future__ import annotations

import os

from celery import shared_task
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


@shared_task(name="bench.jobs_app.plain_noop")
def plain_noop() -> None:
    """Does nothing, in no tenant."""


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
    broker = broker_url or os.environ.get("BENCH_BROKER_URL", "memory://")
    app.config.update(
        CORE_SETTINGS,
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=[tenant_name(i) for i in range(tenants)],
        CELERY={
            "broker_url": broker,
            "result_backend": broker.replace("memory://", "cache+memory://"),
            "task_ignore_result": False,
            "worker_prefetch_multiplier": 16,
        },
    )
    if signing:
        app.config["TENANT_JOBS_SIGNING_KEY"] = SIGNING_KEY
    if fair:
        app.config["TENANT_JOBS_FAIR_DISPATCH"] = True
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app
