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
import uuid

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Engine
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


# -- one test run's schemas (tests/test_schema.py, tests/test_schema_paths.py) -------------------

#: The schemas of this run start with it, so runs on one database never meet.
PREFIX = f"ftjt{uuid.uuid4().hex[:8]}"
SHARED = f"{PREFIX}_shared"
SCHEMA_FORMAT = PREFIX + "_t_{tenant}"
#: The tenants whose schemas a run creates, and all it knows: ghost never gets a schema.
CREATED = ["acme", "globex", "acme-eu"]
RUN_TENANTS = [*CREATED, "ghost"]


def run_schemas(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        rows = connection.scalars(
            sa.text("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, :prefix)"),
            {"prefix": PREFIX},
        )
        return set(rows)


def reset_schemas(engine: Engine, *, keep_shared: bool) -> None:
    """Drop every schema of this run; re-create an empty shared schema if asked."""
    with engine.begin() as connection:
        for schema in run_schemas(engine):
            connection.execute(sa.schema.DropSchema(schema, cascade=True))
        if keep_shared:
            connection.execute(sa.schema.CreateSchema(SHARED))


def make_run_app(postgres_url: str, **config: t.Any) -> Flask:
    """The app on this run's schemas, knowing :data:`RUN_TENANTS`."""
    settings: dict[str, t.Any] = {
        "SQLALCHEMY_DATABASE_URI": postgres_url,
        "TENANT_JOBS_SCHEMA_FORMAT": SCHEMA_FORMAT,
        "TENANT_JOBS_SHARED_SCHEMA": SHARED,
        "TENANT_JOBS_TENANTS": RUN_TENANTS,
        **config,
    }
    return create_app(**settings)


def schema_of(name: str) -> str:
    return SCHEMA_FORMAT.format(tenant=name)


def tables_in(engine: Engine, schema: str) -> set[str]:
    with engine.connect() as connection:
        rows = connection.scalars(
            sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
            {"s": schema},
        )
        return set(rows)


#: What ``flask tenant-jobs migrate`` prints per tenant of a run, sorted: ghost has no schema.
MIGRATE_LINES = [
    "acme-eu: ok",
    "acme: ok",
    f"ghost: failed: SchemaNotFoundError: The schema '{schema_of('ghost')}' of tenant "
    "'ghost' does not exist: create it with 'tenant_jobs.create('ghost')' or "
    "'flask tenant-jobs create ghost'.",
    "globex: ok",
]
