"""The schema strategy's search_path against every way a transaction can move under it.

The path set on a connection is trusted only while PostgreSQL can be relied on to
still have it. These tests change it behind the strategy's back: a savepoint
rollback however it is spelled, SQL that sets or resets the path itself, and the
SQLAlchemy and psycopg features that begin, end or hand over transactions and
connections. A statement must always read the current tenant's schema. Runs on
the real PostgreSQL with the fixtures of tests/test_schema.py (one pooled
connection).
"""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from tests import test_schema
from tests.schema_app import Item, db
from tests.schema_app import tenant_jobs as jobs
from tests.test_schema import (
    CREATED,
    SHARED,
    assert_clean,
    make_app,
    reset_schemas,
    schema_of,
)

# the fixtures of tests/test_schema.py: the schemas of one run, on one pooled connection
admin = test_schema.admin
app = test_schema.app
seeded = test_schema.seeded
default_path = test_schema.default_path

pytestmark = pytest.mark.postgres

NAMES = sa.text("SELECT name FROM items ORDER BY id")


def names(connection: Connection) -> list[str]:
    """The items the connection sees through its current search_path (``text()`` SQL)."""
    return list(connection.scalars(NAMES))


def orm_names() -> list[str]:
    return list(db.session.scalars(sa.select(Item.name).order_by(Item.id)))


def run_as_text(connection: Connection, sql: str) -> None:
    connection.execute(sa.text(sql))


def run_as_driver_sql(connection: Connection, sql: str) -> None:
    connection.exec_driver_sql(sql)


RUNNERS: dict[str, t.Callable[[Connection, str], None]] = {
    "text()": run_as_text,
    "exec_driver_sql()": run_as_driver_sql,
}

#: (SAVEPOINT, ROLLBACK TO SAVEPOINT) as an application may spell them
SAVEPOINT_SPELLINGS = {
    "block comment": ("/* c */ SAVEPOINT sp", "/* c */ ROLLBACK TO SAVEPOINT sp"),
    "line comment": ("-- c\nSAVEPOINT sp", "-- c\nROLLBACK TO SAVEPOINT sp"),
    "lowercase, odd whitespace": ("savepoint\tsp", "rollback\n\tto   sp"),
    "parenthesised comment and keyword case": ("/**/SaVePoInT sp", "/* x */ RoLlBaCk To sp"),
}


@pytest.fixture
def shared_copy(seeded: None) -> None:
    """An ``items`` table in the shared schema too: a path that falls through reads it."""
    db.create_all()
    db.session.execute(sa.text("INSERT INTO items (id, name) VALUES (1, 'shared-1')"))
    db.session.commit()


# -- 1. a savepoint rolled back, however it is written ------------------------------------


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("spelling", SAVEPOINT_SPELLINGS)
def test_a_savepoint_rollback_in_any_spelling_never_leaves_another_tenants_path(
    app: Flask, seeded: None, default_path: str, runner: str, spelling: str
) -> None:
    """After SAVEPOINT; a switch; ROLLBACK TO SAVEPOINT, PostgreSQL is back on acme's path."""
    run = RUNNERS[runner]
    savepoint, rollback = SAVEPOINT_SPELLINGS[spelling]
    with jobs.switch("acme"):
        connection = db.session.connection()
        assert names(connection) == ["acme-1"]
        run(connection, savepoint)
        with jobs.switch("globex"):
            assert names(connection) == ["globex-1"]  # the path is set inside the savepoint
            run(connection, rollback)  # ... and undone here
            assert names(connection) == ["globex-1"]
            assert orm_names() == ["globex-1"]
        assert names(connection) == ["acme-1"]
        db.session.rollback()
    assert_clean(default_path)


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_savepoint_rolled_back_after_an_error_in_another_tenant(
    app: Flask, seeded: None, runner: str
) -> None:
    run = RUNNERS[runner]
    with jobs.switch("acme"):
        connection = db.session.connection()
        assert names(connection) == ["acme-1"]
        run(connection, "/* c */ SAVEPOINT sp")
        with jobs.switch("globex"):
            assert names(connection) == ["globex-1"]
            with pytest.raises(sa.exc.DBAPIError):
                run(connection, "SELECT 1 / 0")
            run(connection, "/* c */ ROLLBACK TO SAVEPOINT sp")
            assert names(connection) == ["globex-1"]
        assert names(connection) == ["acme-1"]
        db.session.rollback()


def test_a_core_connections_own_savepoints(app: Flask, seeded: None, default_path: str) -> None:
    """``begin_nested()`` on a Core connection, rolled back and released, across switches."""
    with db.engine.connect() as connection:
        with jobs.switch("acme"):
            assert names(connection) == ["acme-1"]
            savepoint = connection.begin_nested()
            with jobs.switch("globex"):
                assert names(connection) == ["globex-1"]
                savepoint.rollback()
                assert names(connection) == ["globex-1"]
            with connection.begin_nested(), jobs.switch("acme-eu"):
                assert names(connection) == ["acme-eu-1"]
            assert names(connection) == ["acme-1"]
        connection.rollback()
    assert_clean(default_path)


# -- 2. SQL that sets or resets the path itself --------------------------------------------

PATH_CHANGES = {
    "SET LOCAL search_path": f'SET LOCAL search_path TO "{SHARED}"',
    "SET search_path": f'SET search_path TO "{SHARED}"',
    "RESET search_path": "RESET search_path",
    "RESET ALL": "RESET ALL",
    "set_config()": f"SELECT set_config('search_path', '\"{SHARED}\"', true)",
    "DO block": (
        f"DO $$ BEGIN PERFORM set_config('search_path', '\"{SHARED}\"', true); END $$"
    ),
    "a function that runs SET": "SELECT ftjt_shared_path()",
}


@pytest.fixture
def path_function(shared_copy: None) -> None:
    """A function of the application's that moves the path to the shared schema."""
    db.session.execute(
        sa.text(
            f'CREATE FUNCTION "{SHARED}".ftjt_shared_path() RETURNS void LANGUAGE plpgsql '
            f"AS $$ BEGIN SET LOCAL search_path TO \"{SHARED}\"; END $$"
        )
    )
    db.session.commit()


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("change", PATH_CHANGES)
def test_sql_that_moves_the_path_lasts_one_statement(
    app: Flask, path_function: None, default_path: str, runner: str, change: str
) -> None:
    """The next statement runs in the tenant's schema again, in a one-tenant transaction."""
    with jobs.switch("acme"):
        connection = db.session.connection()
        assert names(connection) == ["acme-1"]
        RUNNERS[runner](connection, PATH_CHANGES[change])
        assert names(connection) == ["acme-1"]
        assert orm_names() == ["acme-1"]
        db.session.commit()
    if change == "SET search_path":  # a session setting of the application's own: it stays
        assert test_schema.raw_search_path() == SHARED
        with db.engine.connect() as connection:
            connection.exec_driver_sql("RESET search_path")
            connection.commit()
    assert_clean(default_path)


@pytest.mark.parametrize("runner", RUNNERS)
def test_sql_that_sets_another_tenants_path_lasts_one_statement(
    app: Flask, seeded: None, runner: str
) -> None:
    with jobs.switch("acme"):
        connection = db.session.connection()
        assert names(connection) == ["acme-1"]
        with jobs.switch("globex"):
            assert names(connection) == ["globex-1"]
            RUNNERS[runner](connection, f'SET LOCAL search_path TO "{schema_of("acme")}"')
            assert names(connection) == ["globex-1"]
        db.session.rollback()


def test_discard_all_on_an_autocommit_connection(
    app: Flask, shared_copy: None, default_path: str
) -> None:
    options = {"isolation_level": "AUTOCOMMIT"}
    with jobs.switch("acme"), db.engine.connect().execution_options(**options) as connection:
        assert names(connection) == ["acme-1"]
        connection.exec_driver_sql("DISCARD ALL")
        assert names(connection) == ["acme-1"]
        connection.exec_driver_sql(f'SET search_path TO "{schema_of("globex")}"')
        assert names(connection) == ["acme-1"]
        with jobs.switch("globex"):
            assert names(connection) == ["globex-1"]
    assert_clean(default_path)
