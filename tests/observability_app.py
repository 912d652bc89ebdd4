"""The app the observability tests run: a few tenant tasks that succeed, retry and fail.

Importable by worker subprocesses (``flask --app tests.observability_app tenant-jobs
worker``), so it is configured from environment variables:
``TEST_OBSERVABILITY_BROKER_URL`` (default the in-memory broker),
``TEST_OBSERVABILITY_BACKEND_URL`` (default ``cache+memory://``) and
``TEST_OBSERVABILITY_METRICS_PORT``: when set, the worker's main process serves the Prometheus
metrics of all its pool processes there (``PROMETHEUS_MULTIPROC_DIR`` set by the caller).
"""

from __future__ import annotations

import os
import time
import typing as t

from celery import Task, shared_task
from celery.signals import worker_init
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs, TenantScoped, current_tenant, tenant_task

db = SQLAlchemy()
tenant_jobs = TenantJobs()
TENANTS = ["acme", "globex", "initech"]


class Note(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """A tenant-scoped row, for statements that carry the tenant."""

    __tablename__ = "obs_note"
    id = db.Column(db.Integer, primary_key=True)
    text = db.Column(db.String(80), nullable=False)


@tenant_task(name="obs.report")
def report(label: t.Any = None) -> str | None:
    """Return the current tenant (chains pass the previous result in as ``label``)."""
    return current_tenant()


@tenant_task(name="obs.nap")
def nap(seconds: float) -> str | None:
    """Sleep, then return the current tenant (so that every pool process gets work)."""
    time.sleep(seconds)
    return current_tenant()


@tenant_task(name="obs.flaky", bind=True, max_retries=2, default_retry_delay=0)
def flaky(self: Task) -> int:
    """Retry twice, then return the number of retries."""
    if self.request.retries < 2:
        raise self.retry(countdown=0)
    return int(self.request.retries)


@tenant_task(name="obs.boom")
def boom(label: t.Any = None) -> None:
    """Always fail."""
    raise RuntimeError(f"boom in {current_tenant()}")


@tenant_task(name="obs.errback_boom")
def errback_boom(*args: t.Any) -> None:
    """A ``link_error`` target that fails itself."""
    raise LookupError(f"errback failed in {current_tenant()}")


@shared_task(name="obs.plain_report")
def plain_report() -> str | None:
    """A plain task: it runs with no tenant."""
    return current_tenant()


def create_app(**overrides: t.Any) -> Flask:
    """The test app; ``overrides`` update ``app.config`` (``CELERY`` merges)."""
    app = Flask(__name__)
    celery_config = {
        "broker_url": os.environ.get("TEST_OBSERVABILITY_BROKER_URL", "memory://"),
        "result_backend": os.environ.get("TEST_OBSERVABILITY_BACKEND_URL", "cache+memory://"),
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    celery_config.update(overrides.pop("CELERY", {}))
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=TENANTS,
        CELERY=celery_config,
    )
    app.config.update(overrides)
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app


@worker_init.connect
def _serve_metrics(**_: t.Any) -> None:
    """In the worker's main process: serve the metrics of every pool process."""
    port = os.environ.get("TEST_OBSERVABILITY_METRICS_PORT")
    if port:
        from flask_tenant_jobs.integrations.prometheus import start_metrics_server

        start_metrics_server(int(port), "127.0.0.1")
