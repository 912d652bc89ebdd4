"""A small multi-tenant shop: tenants ``acme`` and ``globex`` keep their own orders.

Run ``python -m example_app demo`` for a self-checking tour, or
``flask --app example_app run`` to serve it and ``flask --app example_app
tenant-jobs worker`` to run its jobs. Environment variables:

* ``DATABASE_URL``: another database than the default SQLite file (in the
  instance folder), e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/shop``;
* ``TENANT_JOBS_STRATEGY=schema``: one PostgreSQL schema per tenant instead of a
  ``tenant_id`` column (needs a PostgreSQL ``DATABASE_URL``); the schemas are
  created at start-up when missing;
* ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND``: another broker than the
  embedded one (SQLite files in the instance folder, see ``broker.py``), e.g.
  ``redis://127.0.0.1:6379/0``; on Redis, fair dispatch is turned on
  (``TENANT_JOBS_FAIR_DISPATCH``: a tenant with many jobs waiting does not hold
  the other shops' jobs back) and ``/queue`` shows the jobs waiting per shop;
* ``FLASK_*``: any other setting, e.g. ``FLASK_SERVER_NAME=localhost:5000`` or
  ``FLASK_TENANT_JOBS_SCHEMA_FORMAT=shop_{tenant}``.
"""

from __future__ import annotations

import os
import typing as t

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs

from .broker import embedded_config

db = SQLAlchemy()
tenant_jobs = TenantJobs()

TENANTS = ["acme", "globex"]


def create_app(
    config: t.Mapping[str, t.Any] | None = None, instance_path: str | None = None
) -> Flask:
    """Build the app; ``config`` overrides the defaults (and ``FLASK_*`` variables).

    ``instance_path`` holds the default SQLite database and the embedded broker
    (default: ``instance/`` next to this package).
    """
    app = Flask(__name__, instance_path=os.path.abspath(instance_path) if instance_path else None)
    app.config.from_mapping(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=database_url(app.instance_path),
        TENANT_JOBS_TENANTS=TENANTS,
        TENANT_JOBS_STRATEGY=os.environ.get("TENANT_JOBS_STRATEGY", "column"),
        CELERY=celery_config(app.instance_path),
    )
    app.config.from_prefixed_env()  # e.g. FLASK_SERVER_NAME=localhost:5000
    if config:
        app.config.update(config)
    # Fair dispatch needs Redis: on unless the settings above say otherwise.
    app.config.setdefault("TENANT_JOBS_FAIR_DISPATCH", on_redis(app.config["CELERY"]))

    # The models are defined before init_app, which checks where their tables are.
    from . import jobs, models, views  # noqa: F401 - jobs registers the tasks

    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    app.register_blueprint(views.bp)
    app.cli.add_command(models.init_db_command)
    with app.app_context():
        models.create_tables()  # schema strategy: also each missing tenant schema
    return app


def database_url(instance_path: str) -> str:
    """``DATABASE_URL`` (``postgres://`` URLs use psycopg 3), else a SQLite file."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        os.makedirs(instance_path, exist_ok=True)
        return "sqlite:///" + os.path.join(instance_path, "example.sqlite3")
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def celery_config(instance_path: str) -> dict[str, t.Any]:
    """Celery settings: ``CELERY_BROKER_URL`` etc., else the embedded broker (SQLite files)."""
    broker = os.environ.get("CELERY_BROKER_URL")
    if broker:
        backend = os.environ.get("CELERY_RESULT_BACKEND", broker)
        return {"broker_url": broker, "result_backend": backend, **BEAT}
    return {**embedded_config(instance_path), **BEAT}


def on_redis(celery: t.Mapping[str, t.Any]) -> bool:
    """Whether the broker is Redis: fair dispatch needs it (the embedded broker is not)."""
    return str(celery.get("broker_url", "")).startswith(("redis://", "rediss://"))


#: Beat runs ``send_digest`` once per tenant every day (``flask tenant-jobs beat``).
BEAT = {
    "beat_schedule": {
        "daily-digest": {"task": "example_app.jobs.send_digest", "schedule": 24 * 3600},
    },
}
