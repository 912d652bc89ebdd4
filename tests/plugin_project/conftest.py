"""A user's conftest: an app factory as the ``app`` fixture, as with pytest-flask."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from flask import Flask, g
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs, TenantScoped, current_tenant, tenant_task

db = SQLAlchemy()
tenant_jobs_extension = TenantJobs()


class Order(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    id = db.Column(db.Integer, primary_key=True)
    status = db.Column(db.String(20), default="pending")


@tenant_task
def process_order(order_id: int) -> str | None:
    order = db.session.get(Order, order_id)
    order.status = "processed"
    db.session.commit()
    return current_tenant()


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/test.db",
        TENANT_JOBS_TENANTS=["acme", "globex"],
        CELERY={"broker_url": "memory://", "task_always_eager": True},
    )
    db.init_app(app)
    tenant_jobs_extension.init_app(app, db=db)

    @app.get("/whoami")
    def whoami() -> dict[str, t.Any]:
        return {"tenant": g.tenant}

    with app.app_context():
        db.create_all()
    return app
