"""The scoping strategies: how the current tenant reaches the database.

Both strategies sit behind :class:`Strategy`, so the request and Celery code
never need to know which one is in use.
"""

from __future__ import annotations

import typing as t

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

if t.TYPE_CHECKING:
    from ..settings import Settings


class Strategy(t.Protocol):
    """What the extension asks of a scoping strategy."""

    def install(self, app: Flask, db: SQLAlchemy) -> None:
        """Hook the strategy into ``db``'s sessions and engines for ``app``, and answer its
        own errors raised in views (``responses.answer_not_found``)."""

    def check_tenant(self, name: str) -> None:
        """Raise if the tenant cannot be entered (e.g. its schema is missing)."""

    def create(self, name: str) -> list[str]:
        """Make the storage of a new tenant; return the tables made."""

    def drop(self, name: str) -> dict[str, int]:
        """Remove the storage (or rows) of a tenant; return the rows removed per table."""

    def migrate(self, name: str) -> None:
        """Bring the storage of an existing tenant up to date."""

    def describe(self, name: str) -> dict[str, str]:
        """Facts about the tenant's storage, for ``flask tenant-jobs list``."""

    def check_storage(self) -> list[str]:
        """Problems with the storage as a whole, each with what to do about it."""


def _column(settings: Settings, db: SQLAlchemy) -> Strategy:
    """A ``tenant_id`` column on every ``TenantScoped`` table (:mod:`.column`)."""
    from .column import ColumnStrategy

    return ColumnStrategy(db)


def _schema(settings: Settings, db: SQLAlchemy) -> Strategy:
    """One PostgreSQL schema per tenant (:mod:`.schema`)."""
    from .schema import SchemaStrategy

    return SchemaStrategy(settings, db)


#: The strategies, by the ``TENANT_JOBS_STRATEGY`` value that picks them. Each is
#: imported when picked: its module reads the settings, which check against this.
STRATEGIES: dict[str, t.Callable[[Settings, SQLAlchemy], Strategy]] = {
    "column": _column,
    "schema": _schema,
}


def make_strategy(settings: Settings, db: SQLAlchemy) -> Strategy:
    """The strategy that ``TENANT_JOBS_STRATEGY`` names."""
    return STRATEGIES[settings.strategy](settings, db)
