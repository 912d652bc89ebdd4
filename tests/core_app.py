"""Helpers shared by the core test modules: an app factory, tables and a SQL counter.

Each test module declares its own models on its own ``SQLAlchemy()``, so table
names never clash between modules; the helpers here take that ``db``.
"""

from __future__ import annotations

import os
import typing as t
from contextlib import contextmanager

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine

from flask_tenant_jobs import TenantJobs

TENANTS = ["globex", "acme", "initech"]  # deliberately unsorted

#: ``TEST_CORE_RLS=1`` (``.ci/run`` sets it for a second run of tests/test_column.py):
#: apps that :func:`make_app` makes on PostgreSQL have ``TENANT_JOBS_RLS`` on, :func:`tables`
#: protects their tables with the policies, and the ``database_url`` fixture connects as a
#: role that row-level security applies to (neither superuser nor ``BYPASSRLS``).
RLS_SUITE = os.environ.get("TEST_CORE_RLS") == "1"


def make_app(db: SQLAlchemy, database_url: str, **config: t.Any) -> tuple[Flask, TenantJobs]:
    """A Flask app on ``database_url`` with ``db`` and a fresh ``TenantJobs`` extension.

    Defaults: ``SERVER_NAME="example.test"`` and the tenants of :data:`TENANTS`;
    ``config`` overrides or adds settings. See :data:`RLS_SUITE`.
    """
    if RLS_SUITE and database_url.startswith("postgresql"):
        config = {"TENANT_JOBS_RLS": True, **config}
        if not config.get("TENANT_JOBS_REQUIRE_TENANT", True):
            pytest.skip(
                "TENANT_JOBS_RLS refuses TENANT_JOBS_REQUIRE_TENANT=False, since it fails "
                "closed (tests/test_rls.py checks the refusal)"
            )
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        SERVER_NAME="example.test",
        TENANT_JOBS_TENANTS=list(TENANTS),
    )
    app.config.update(config)
    db.init_app(app)
    tenant_jobs = TenantJobs(app, db=db)
    return app, tenant_jobs


@contextmanager
def tables(app: Flask, db: SQLAlchemy) -> t.Iterator[None]:
    """Create ``db``'s tables for the block, then drop them and close the connections.

    With ``TENANT_JOBS_RLS`` on, the tenant tables get their row-level security policies.
    """
    with app.app_context():
        db.create_all()
        if app.config.get("TENANT_JOBS_RLS"):
            tenant_jobs = app.extensions["tenant_jobs"]
            tenant_jobs.enable_rls()
            problems = tenant_jobs.check_rls()
            assert not problems, problems  # a role that RLS applies to, every table protected
    try:
        yield
    finally:
        with app.app_context():
            db.session.remove()
            db.drop_all()
            db.engine.dispose()


class StatementCounter:
    """Records every SQL statement an engine sends while attached."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        self.statements.append(statement)

    @property
    def count(self) -> int:
        """How many statements were sent since the counter was attached or cleared."""
        return len(self.statements)

    def clear(self) -> None:
        """Forget the statements recorded so far."""
        self.statements.clear()

    def detach(self) -> None:
        """Stop recording."""
        event.remove(self.engine, "before_cursor_execute", self._record)


@contextmanager
def count_statements(engine: Engine) -> t.Iterator[StatementCounter]:
    """Count the statements ``engine`` sends inside the block."""
    counter = StatementCounter(engine)
    try:
        yield counter
    finally:
        counter.detach()
