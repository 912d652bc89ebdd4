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

from .schema_app import CREATED, SHARED, Item, db, make_run_app, reset_schemas
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


@pytest.fixture
def default_path(admin: Engine) -> str:
    """The search_path a fresh connection of this database and role starts with."""
    with admin.connect() as connection:
        return t.cast(str, connection.scalar(sa.text("SHOW search_path")))


def raw_search_path() -> str:
    """The pooled connection's search_path as it is: read past the strategy's hook."""
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SHOW search_path")
        value = t.cast(str, cursor.fetchone()[0])
        cursor.close()
        raw.rollback()
    finally:
        raw.close()
    return value


def hooked_search_path() -> str:
    """The search_path a new user of the engine gets for its first statement."""
    with db.engine.connect() as connection:
        return t.cast(str, connection.scalar(sa.text("SHOW search_path")))


def item_names() -> list[str]:
    names = list(db.session.scalars(sa.select(Item.name).order_by(Item.id)))
    db.session.commit()
    return names


def assert_clean(default_path: str) -> None:
    """Nothing of a tenant is left on the connection, and each tenant sees its own rows."""
    assert raw_search_path() == default_path
    assert hooked_search_path() == f'"{SHARED}"'
    for name in CREATED:
        with jobs.switch(name):
            assert item_names() == [f"{name}-1"]
