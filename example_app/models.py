"""The example's tenant-scoped model."""

from __future__ import annotations

import datetime as dt
import typing as t

import click
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs import TenantScoped

from . import db


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Order(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """An order of one tenant; ``tenant_id`` comes from ``TenantScoped``."""

    __tablename__ = "example_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(db.String(100))
    status: Mapped[str] = mapped_column(db.String(20), default="pending")
    created_at: Mapped[dt.datetime] = mapped_column(db.DateTime(timezone=True), default=_now)

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "id": self.id,
            "item": self.item,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "tenant": self.tenant_id,
        }


def reset_db() -> None:
    """Drop and re-create the example's tables (all tenants' rows go)."""
    db.drop_all()
    db.create_all()


@click.command("init-db")
def init_db_command() -> None:
    """Drop and re-create the example's tables."""
    reset_db()
    click.echo("Re-created the tables.")
