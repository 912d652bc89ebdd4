"""The app of the schema-strategy tests: shared and tenant models on PostgreSQL.

Importable by subprocesses (``flask --app tests.schema_app tenant-jobs list``), so
:func:`create_app` with no arguments reads its settings from the environment:
``TEST_SCHEMA_DATABASE_URL`` (default: ``TEST_POSTGRES_URL``), ``TEST_SCHEMA_SCHEMA_FORMAT``,
``TEST_SCHEMA_SHARED_SCHEMA`` and ``TEST_SCHEMA_TENANTS`` (comma-separated).

The engine pool holds ONE connection, so every test reuses the same PostgreSQL
connection and any search_path left behind would be seen by the next user.
"""

from __future__ import annotations

import os
import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column, relationship

from flask_tenant_jobs import TenantJobs, TenantScoped

from .data import POSTGRES_URL

db = SQLAlchemy(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
tenant_jobs = TenantJobs()


class Tenant(db.Model):  # type: ignore[name-defined,misc]
    """A shared model: the tenants table of the documented recipe."""

    __tenant_shared__ = True
    __tablename__ = "tenants"
    name: Mapped[str] = mapped_column(sa.String(63), primary_key=True)
    #: the tenant rows named like this shared row (no foreign key: tables stay as they are)
    items: Mapped[list[Item]] = relationship(
        primaryjoin="Tenant.name == foreign(Item.name)", viewonly=True, order_by="Item.id"
    )


class Item(db.Model):  # type: ignore[name-defined,misc]
    """A tenant model: lives in each tenant's schema."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    notes: Mapped[list[Note]] = relationship(back_populates="item")


class Note(db.Model):  # type: ignore[name-defined,misc]
    """A tenant model referencing another tenant model."""

    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id"))
    text: Mapped[str] = mapped_column(sa.String(50))
    item: Mapped[Item] = relationship(back_populates="notes")


class Order(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """A column-strategy model used in schema mode: ``tenant_id`` still filled on flush."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")


def create_app(**config: t.Any) -> Flask:
    """The app; ``config`` overrides the settings read from the environment."""
    app = Flask(__name__)
    tenants = os.environ.get("TEST_SCHEMA_TENANTS", "acme,globex")
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=os.environ.get("TEST_SCHEMA_DATABASE_URL") or POSTGRES_URL,
        TENANT_JOBS_STRATEGY="schema",
        TENANT_JOBS_TENANTS=[name for name in tenants.split(",") if name],
        TENANT_JOBS_SCHEMA_FORMAT=os.environ.get("TEST_SCHEMA_SCHEMA_FORMAT", "tenant_{tenant}"),
        TENANT_JOBS_SHARED_SCHEMA=os.environ.get("TEST_SCHEMA_SHARED_SCHEMA", "public"),
    )
    app.config.update(config)
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)

    @app.get("/items")
    def items() -> dict[str, list[str]]:
        return {"items": list(db.session.scalars(sa.select(Item.name).order_by(Item.id)))}

    return app
