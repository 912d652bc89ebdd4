"""The fixtures of the schema suites (tests/test_schema.py, tests/test_schema_paths.py and
the schema commands in tests/test_cli.py): this run's schemas on the real PostgreSQL.

A suite takes them by name: ``admin = schema_fixtures.admin``.
"""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from .schema_app import CREATED, Item, db, make_run_app, reset_schemas
from .schema_app import tenant_jobs as jobs


@pytest.fixture(scope="module")
def admin(postgres_url: str) -> t.Iterator[Engine]:
    """A plain engine, without the strategy's hooks, to look at the database from outside."""
    engine = sa.create_engine(postgres_url, poolclass=NullPool)
    yield engine
    reset_schemas(engine, keep_shared=False)
    engine.dispose()


@pytest.fixture
def app(postgres_url: str, admin: Engine) -> t.Iterator[Flask]:
    """The app with the schemas of acme, globex and acme-eu (pytest-flask pushes its context)."""
    reset_schemas(admin, keep_shared=True)
    app = make_run_app(postgres_url)
    with app.app_context():
        for name in CREATED:
            jobs.create(name)
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    reset_schemas(admin, keep_shared=False)


@pytest.fixture
def seeded(app: Flask) -> None:
    """Item 1 in each tenant, named after it: the same primary key in every schema."""
    for name in CREATED:
        with jobs.switch(name):
            db.session.add(Item(id=1, name=f"{name}-1"))
            db.session.commit()
