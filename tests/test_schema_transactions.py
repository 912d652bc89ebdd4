"""The schema strategy's search_path against every way a transaction can move under it.

The path set on a connection is trusted only while PostgreSQL can be relied on to
still have it. These tests change it behind the strategy's back: a savepoint
rollback however it is spelled, SQL that sets or resets the path itself, and the
SQLAlchemy and psycopg features that begin, end or hand over transactions and
connections. A statement must always read the current tenant's schema. Runs on
the real PostgreSQL with the fixtures of tests/schema_fixtures.py (one pooled
connection).
"""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from flask_tenant_jobs.errors import SchemaNotFoundError
from tests import schema_fixtures
from tests.schema_app import CREATED, SHARED, Item, db, make_run_app, reset_schemas, schema_of
from tests.schema_app import tenant_jobs as jobs
from tests.schema_fixtures import assert_clean

# the schemas of one run, on one pooled connection
admin = schema_fixtures.admin
app = schema_fixtures.app
seeded = schema_fixtures.seeded
default_path = schema_fixtures.default_path

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
        assert schema_fixtures.raw_search_path() == SHARED
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


def test_an_autocommit_write_to_a_schema_dropped_behind_the_cache_never_lands_elsewhere(
    app: Flask, admin: Engine, shared_copy: None
) -> None:
    jobs.validate("acme-eu")  # cached as existing
    with admin.begin() as connection:
        connection.execute(sa.schema.DropSchema(schema_of("acme-eu"), cascade=True))
    options = {"isolation_level": "AUTOCOMMIT"}
    autocommit = db.engine.connect().execution_options(**options)
    with jobs.switch("acme-eu"), autocommit, pytest.raises(SchemaNotFoundError):
        autocommit.exec_driver_sql("INSERT INTO items (id, name) VALUES (2, 'lost')")
    with admin.connect() as connection:
        rows = connection.scalars(sa.text(f'SELECT name FROM "{SHARED}".items ORDER BY id'))
        assert list(rows) == ["shared-1"]
    with pytest.raises(SchemaNotFoundError), jobs.switch("acme-eu"):
        pass


# -- 3. what begins, ends or hands over transactions and connections ----------------------


def test_the_path_rides_on_begin_once_per_one_tenant_transaction(
    app: Flask, seeded: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cheap: one path per transaction, in BEGIN's round trip; after a switch inside it,
    in one round trip with each statement SQLAlchemy built, or one of its own before SQL text."""
    setting = jobs._state().strategy._search_path  # type: ignore[attr-defined]
    sent: list[str] = []
    for name in ("_begin_with", "_send", "_pipeline_behind"):
        original = getattr(setting, name)

        def spy(*args: t.Any, _original: t.Any = original, _name: str = name) -> t.Any:
            sent.append(_name)
            return _original(*args)

        monkeypatch.setattr(setting, name, spy)
    with jobs.switch("acme"):
        for _ in range(3):
            assert orm_names() == ["acme-1"]
        assert db.session.get(Item, 1) is not None
        db.session.commit()
    assert sent == ["_begin_with"]
    with jobs.switch("acme"):
        assert orm_names() == ["acme-1"]
        with jobs.switch("globex"):
            assert orm_names() == ["globex-1"]
        assert orm_names() == ["acme-1"]
        assert names(db.session.connection()) == ["acme-1"]
        db.session.commit()
    assert sent == [
        "_begin_with", "_begin_with", "_pipeline_behind", "_pipeline_behind", "_send"
    ]


def test_streamed_results_across_a_switch(app: Flask, seeded: None) -> None:
    """A server-side cursor keeps the rows of the tenant it was opened in."""
    with db.engine.connect() as connection:
        streamed = connection.execution_options(stream_results=True, max_row_buffer=1)
        with jobs.switch("acme"):
            acme = streamed.execute(sa.select(Item.name))
        with jobs.switch("globex"):
            globex = streamed.execute(sa.select(Item.name))
            assert names(connection) == ["globex-1"]
        with jobs.switch("acme"):
            assert names(connection) == ["acme-1"]
        assert acme.scalars().all() == ["acme-1"]
        assert globex.scalars().all() == ["globex-1"]
        connection.rollback()


def test_yield_per_across_a_switch(app: Flask, seeded: None) -> None:
    for name in CREATED:
        with jobs.switch(name):
            db.session.add(Item(id=2, name=f"{name}-2"))
            db.session.commit()
    with jobs.switch("acme"):
        rows = db.session.scalars(
            sa.select(Item.name).order_by(Item.id).execution_options(yield_per=1)
        )
        first = next(rows)
        with jobs.switch("globex"):
            assert orm_names() == ["globex-1", "globex-2"]
        assert [first, *rows] == ["acme-1", "acme-2"]
        db.session.rollback()


def test_a_two_phase_transaction(app: Flask, seeded: None, default_path: str) -> None:
    with db.engine.connect() as connection:
        with jobs.switch("acme"):
            twophase = connection.begin_twophase()
            assert names(connection) == ["acme-1"]
            with jobs.switch("globex"):
                assert names(connection) == ["globex-1"]
            assert names(connection) == ["acme-1"]
            if connection.scalar(sa.text("SHOW max_prepared_transactions")) != "0":
                twophase.prepare()
            twophase.rollback()  # this server may allow no prepared transaction at all
        with jobs.switch("globex"):
            assert names(connection) == ["globex-1"]
        connection.rollback()
    assert_clean(default_path)


def test_a_session_of_the_applications_own(app: Flask, seeded: None, default_path: str) -> None:
    """``Session(db.engine)``: not Flask-SQLAlchemy's session, the same engine hooks."""
    with Session(db.engine) as session:
        for name in CREATED:
            with jobs.switch(name):
                assert session.scalars(sa.select(Item.name)).all() == [f"{name}-1"]
        with jobs.switch("acme"):
            savepoint = session.begin_nested()
            with jobs.switch("globex"):
                assert session.scalars(sa.select(Item.name)).all() == ["globex-1"]
                savepoint.rollback()
                assert session.scalars(sa.select(Item.name)).all() == ["globex-1"]
            assert session.scalars(sa.select(Item.name)).all() == ["acme-1"]
        session.commit()
    assert_clean(default_path)


def test_commits_and_rollbacks_midway_on_one_connection(
    app: Flask, seeded: None, default_path: str
) -> None:
    with db.engine.connect() as connection:
        with jobs.switch("acme"):
            assert names(connection) == ["acme-1"]
            connection.commit()
            assert names(connection) == ["acme-1"]
            with jobs.switch("globex"):
                assert names(connection) == ["globex-1"]
                connection.commit()
                assert names(connection) == ["globex-1"]
                connection.exec_driver_sql("/* c */ COMMIT")
                assert names(connection) == ["globex-1"]
            connection.rollback()
            assert names(connection) == ["acme-1"]
            connection.exec_driver_sql("-- c\nROLLBACK")
            assert names(connection) == ["acme-1"]
        connection.commit()
    assert_clean(default_path)


@pytest.fixture
def app_with(postgres_url: str, admin: Engine) -> t.Iterator[t.Callable[..., Flask]]:
    """Make an app with other settings, its tenants' schemas and item 1 in each."""
    made: list[Flask] = []

    def make(**config: t.Any) -> Flask:
        reset_schemas(admin, keep_shared=True)
        other = make_run_app(postgres_url, **config)
        made.append(other)
        with other.app_context():
            for name in CREATED:
                jobs.create(name)
                with jobs.switch(name):
                    db.session.add(Item(id=1, name=f"{name}-1"))
                    db.session.commit()
        return other

    yield make
    for other in made:
        with other.app_context():
            db.session.remove()
            db.engine.dispose()
    reset_schemas(admin, keep_shared=False)


def test_prepared_statements_follow_the_path(app_with: t.Callable[..., Flask]) -> None:
    """psycopg prepares every statement (``prepare_threshold=0``); plans follow the path."""
    other = app_with(SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"prepare_threshold": 0}})
    with other.app_context():
        for _ in range(3):
            for name in CREATED:
                with jobs.switch(name):
                    assert orm_names() == [f"{name}-1"]
                    db.session.commit()
        with jobs.switch("acme"):
            for _ in range(3):
                for name in CREATED:
                    with jobs.switch(name):
                        assert orm_names() == [f"{name}-1"]
            db.session.rollback()


def test_sql_comments_and_the_path(app_with: t.Callable[..., Flask]) -> None:
    """``TENANT_JOBS_SQL_COMMENT`` runs each statement itself from a driver-execute hook:
    the path still goes first, also in a switched transaction and on AUTOCOMMIT."""
    other = app_with(TENANT_JOBS_SQL_COMMENT=True)
    activity = sa.text("SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()")
    with other.app_context(), db.engine.connect() as connection:
        for name in CREATED:
            with jobs.switch(name):
                # pg_stat_activity is read once per transaction
                assert connection.scalar(activity).endswith(f"/*tenant='{name}'*/")
                connection.rollback()
        for name in [*CREATED, *CREATED]:  # one transaction, switched
            with jobs.switch(name):
                assert names(connection) == [f"{name}-1"]
        connection.rollback()
        autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
        for name in CREATED:
            with jobs.switch(name):
                assert names(autocommit) == [f"{name}-1"]


def test_pre_ping_and_a_killed_connection(
    app_with: t.Callable[..., Flask], admin: Engine
) -> None:
    other = app_with(SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True})
    with other.app_context():
        for name in [*CREATED, *CREATED]:
            with jobs.switch(name):
                assert orm_names() == [f"{name}-1"]
                pid = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
                db.session.commit()
        with admin.connect() as connection:  # the pooled connection dies while checked in
            connection.scalar(sa.text(f"SELECT pg_terminate_backend({pid})"))
        for name in CREATED:
            with jobs.switch(name):
                assert orm_names() == [f"{name}-1"]
                db.session.commit()


def test_a_connection_invalidated_mid_transaction(
    app: Flask, seeded: None, admin: Engine, default_path: str
) -> None:
    with jobs.switch("acme"):
        assert orm_names() == ["acme-1"]
        db.session.connection().invalidate()
        db.session.rollback()
        with jobs.switch("globex"):
            assert orm_names() == ["globex-1"]
        assert orm_names() == ["acme-1"]
        pid = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
        with jobs.switch("globex"):
            assert orm_names() == ["globex-1"]
            with admin.connect() as connection:  # killed mid-transaction
                connection.scalar(sa.text(f"SELECT pg_terminate_backend({pid})"))
            with pytest.raises(sa.exc.DBAPIError):
                orm_names()
            db.session.rollback()
            assert orm_names() == ["globex-1"]
        assert orm_names() == ["acme-1"]
        db.session.commit()
    assert_clean(default_path)


def test_a_detached_connection(app: Flask, seeded: None, default_path: str) -> None:
    with jobs.switch("acme"):
        connection = db.session.connection()
        connection.detach()  # leaves the pool: closed, never checked in
        assert orm_names() == ["acme-1"]
        with jobs.switch("globex"):
            assert orm_names() == ["globex-1"]
        db.session.commit()
        autocommit = db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        with autocommit:
            autocommit.detach()
            assert names(autocommit) == ["acme-1"]
    with jobs.switch("globex"):
        assert orm_names() == ["globex-1"]
        db.session.commit()
    assert_clean(default_path)


def test_a_transaction_opened_at_checkout_still_gets_the_path(
    app: Flask, seeded: None
) -> None:
    """A pool ``checkout`` listener that runs SQL opens the transaction before the first
    statement: it carries no path of the strategy's, so the path goes before each statement."""

    def look_at_the_connection(dbapi_connection: t.Any, *args: t.Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    sa.event.listen(db.engine.pool, "checkout", look_at_the_connection)
    try:
        for name in [*CREATED, *CREATED]:
            with jobs.switch(name), db.engine.begin() as connection:
                assert names(connection) == [f"{name}-1"]
                connection.exec_driver_sql("SAVEPOINT sp")
                with jobs.switch("acme"):
                    assert names(connection) == ["acme-1"]
                    connection.exec_driver_sql("/**/ROLLBACK TO sp")
                assert names(connection) == [f"{name}-1"]
    finally:
        sa.event.remove(db.engine.pool, "checkout", look_at_the_connection)


@pytest.mark.parametrize("built", [True, False], ids=["ORM", "text()"])
def test_a_schema_dropped_behind_the_cache_inside_a_switched_transaction(
    app: Flask, admin: Engine, shared_copy: None, default_path: str, built: bool
) -> None:
    """The path then goes in a pipeline with the statement (or before SQL text): a missing
    schema stops the statement."""
    jobs.validate("acme-eu")  # cached as existing
    with admin.begin() as connection:
        connection.execute(sa.schema.DropSchema(schema_of("acme-eu"), cascade=True))
    with jobs.switch("acme"):
        assert orm_names() == ["acme-1"]
        with jobs.switch("acme-eu"), pytest.raises(SchemaNotFoundError):
            orm_names() if built else names(db.session.connection())
        db.session.rollback()
    assert_clean_but(default_path, "acme-eu")
    with pytest.raises(SchemaNotFoundError), jobs.switch("acme-eu"):
        pass


def test_a_failing_statement_in_a_switched_transaction_is_its_own_error(
    app: Flask, seeded: None, default_path: str
) -> None:
    with jobs.switch("acme"):
        assert orm_names() == ["acme-1"]
        with jobs.switch("globex"), pytest.raises(sa.exc.DataError):
            db.session.execute(sa.select(sa.literal(1) / sa.literal(0)))
        db.session.rollback()
        with jobs.switch("globex"):
            assert orm_names() == ["globex-1"]
        db.session.rollback()
    assert_clean(default_path)


def assert_clean_but(default_path: str, gone: str) -> None:
    """``assert_clean`` for the tenants whose schema still exists."""
    assert schema_fixtures.raw_search_path() == default_path
    for name in CREATED:
        if name != gone:
            with jobs.switch(name):
                assert orm_names() == [f"{name}-1"]
                db.session.commit()


def test_text_in_orm_statements_in_a_switched_transaction(app: Flask, seeded: None) -> None:
    """``from_statement(text())`` and ``text().columns()`` are SQL text: never trusted."""
    from_text = sa.select(Item).from_statement(sa.text("SELECT * FROM items ORDER BY id"))
    textual = sa.text("SELECT name FROM items ORDER BY id").columns(Item.name)
    with jobs.switch("acme"):
        assert [i.name for i in db.session.scalars(from_text)] == ["acme-1"]
        db.session.execute(sa.text("SAVEPOINT sp"))
        with jobs.switch("globex"):
            assert [i.name for i in db.session.scalars(from_text)] == ["globex-1"]
            db.session.execute(sa.text("/* c */ ROLLBACK TO sp; SELECT 1"))
            assert db.session.scalars(textual).all() == ["globex-1"]
            assert [i.name for i in db.session.scalars(from_text)] == ["globex-1"]
        assert db.session.scalars(textual).all() == ["acme-1"]
        db.session.rollback()
