"""The example's models: one tenant model (orders) and one shared model (the shops).

``Order`` rows belong to one tenant: a ``tenant_id`` column with the column
strategy, the tenant's own schema with the schema strategy. ``Shop`` is shared:
one table for everyone (in the shared schema with the schema strategy).
"""

from __future__ import annotations

import datetime as dt
import typing as t

import click
from flask import current_app
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs import TenantScoped

from . import db, tenant_jobs

#: The shops' display names (a tenant without one is shown by its name).
TITLES = {"acme": "Acme Corporation", "globex": "Globex Corporation"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Shop(db.Model):  # type: ignore[name-defined,misc]
    """A tenant's display name: shared by all tenants, read from any of them."""

    __tablename__ = "example_shops"
    __tenant_shared__ = True  # schema strategy: lives in the shared schema

    name: Mapped[str] = mapped_column(db.String(63), primary_key=True)
    title: Mapped[str] = mapped_column(db.String(100))


class Order(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """An order of one tenant; ``tenant_id`` comes from ``TenantScoped``."""

    __tablename__ = "example_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(db.String(100))
    status: Mapped[str] = mapped_column(db.String(20), default="pending")
    created_at: Mapped[dt.datetime] = mapped_column(db.DateTime(timezone=True), default=_now)
    #: The id of the order's ``process_order`` job (its status page is /jobs/<job_id>).
    job_id: Mapped[str | None] = mapped_column(db.String(36), index=True)

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "id": self.id,
            "item": self.item,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "tenant": self.tenant_id,
            "job": self.job_id,
        }


def shared_tables() -> list[t.Any]:
    """The tables of the shared models (``__tenant_shared__ = True``)."""
    return [
        mapper.local_table
        for mapper in db.Model.registry.mappers
        if getattr(mapper.class_, "__tenant_shared__", False)
    ]


def schema_strategy() -> bool:
    return bool(current_app.config.get("TENANT_JOBS_STRATEGY") == "schema")


def create_tables() -> None:
    """Create what is missing: the tables and, with the schema strategy, the tenant schemas.

    Column strategy: every table, shared by all tenants. Schema strategy: the
    shared tables in the shared schema only, and a schema with its tables for
    each tenant whose schema does not exist yet (``tenant_jobs.create``).
    """
    if schema_strategy():
        db.metadata.create_all(db.engine, tables=shared_tables())
        for name in tenant_jobs.tenant_names():
            if tenant_jobs.describe(name)["exists"] == "no":
                tenant_jobs.create(name)
    else:
        db.create_all()
    known = set(db.session.scalars(db.select(Shop.name)))
    missing = [name for name in tenant_jobs.tenant_names() if name not in known]
    db.session.add_all(Shop(name=name, title=TITLES.get(name, name)) for name in missing)
    db.session.commit()


def reset_db() -> None:
    """Drop and re-create the tenant tables: every tenant's orders go; the shops stay.

    With the schema strategy, each tenant's schema is dropped and created again.
    """
    if schema_strategy():
        for name in tenant_jobs.tenant_names():
            tenant_jobs.drop(name)
    else:
        shared = shared_tables()
        tenant_tables = [table for table in db.metadata.sorted_tables if table not in shared]
        db.metadata.drop_all(db.engine, tables=tenant_tables)
    create_tables()


@click.command("init-db")
def init_db_command() -> None:
    """Drop and re-create the tenant tables (schema strategy: the tenant schemas)."""
    reset_db()
    click.echo("Re-created the tables.")
