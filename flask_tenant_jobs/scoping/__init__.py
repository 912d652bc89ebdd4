"""The scoping strategies: how the current tenant reaches the database.

Both strategies sit behind :class:`Strategy`, so the request and Celery code
never need to know which one is in use.
"""

from __future__ import annotations

import typing as t

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from ..settings import Settings


class Strategy(t.Protocol):
    """What the extension asks of a scoping strategy."""

    def install(self, app: Flask, db: SQLAlchemy) -> None:
        """Hook the strategy into ``db``'s sessions and engines for ``app``."""

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


def make_strategy(settings: Settings, db: SQLAlchemy) -> Strategy:
    """The strategy that ``TENANT_JOBS_STRATEGY`` names."""
    from .column import ColumnStrategy
    from .schema import SchemaStrategy

    if settings.strategy == "schema":
        return SchemaStrategy(settings, db)
    return ColumnStrategy(db)
