"""SQL comments (``TENANT_JOBS_SQL_COMMENT``): the tenant at the end of every statement.

On SQLite and the real PostgreSQL (column strategy), and on PostgreSQL with the schema
strategy. What the server received is read back where it can be: PostgreSQL's
``current_query()`` and ``pg_stat_activity``, psycopg's server-side prepared statements
(``pg_prepared_statements``), and SQLite's trace callback (the SQL as executed).
"""

from __future__ import annotations

import threading
import time
import typing as t

import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import event

from flask_tenant_jobs import context
from flask_tenant_jobs.integrations import sqlcomment
from flask_tenant_jobs.integrations.sqlcomment import sql_comment, with_comment

from . import observability_app
from .observability_app import Note, db, tenant_jobs

ACME = " /*tenant='acme'*/"
SCHEMA_FORMAT = "ftjobs_{tenant}"


#: What the driver was handed, in order (see ``_recording_app``).
RECORDED: list[str] = []


class RecordingCursor(psycopg.Cursor):  # type: ignore[type-arg]
    """A psycopg cursor that records each query it is given."""

    def execute(self, query: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        RECORDED.append(str(query))
        return super().execute(query, *args, **kwargs)

    def executemany(self, query: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        RECORDED.append(str(query))
        return super().executemany(query, *args, **kwargs)


class RecordingServerCursor(psycopg.ServerCursor):  # type: ignore[type-arg]
    """A psycopg server-side cursor (``yield_per``, ``stream_results``) that records too."""

    def execute(self, query: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        RECORDED.append(str(query))
        return super().execute(query, *args, **kwargs)


def _recording_app(database_url: str, **config: t.Any) -> Flask:
    """An app whose driver records the SQL it gets: psycopg's cursors, SQLite's trace."""
    options = config.pop("SQLALCHEMY_ENGINE_OPTIONS", {})
    if database_url.startswith("postgresql"):
        options = {**options, "connect_args": {
            **options.get("connect_args", {}), "cursor_factory": RecordingCursor,
        }}
    app = observability_app.create_app(
        SQLALCHEMY_DATABASE_URI=database_url, SQLALCHEMY_ENGINE_OPTIONS=options, **config
    )
    with app.app_context():
        event.listen(db.engine, "connect", _record_driver_sql)
    return app


def _record_driver_sql(dbapi_connection: t.Any, record: t.Any) -> None:
    if isinstance(dbapi_connection, psycopg.Connection):
        dbapi_connection.server_cursor_factory = RecordingServerCursor
    else:
        dbapi_connection.set_trace_callback(RECORDED.append)


@pytest.fixture
def app(database_url: str) -> t.Iterator[Flask]:
    """A column-strategy app with comments on, its tables made; on SQLite and PostgreSQL."""
    app = _recording_app(database_url, TENANT_JOBS_SQL_COMMENT=True)
    with app.app_context():
        db.drop_all()
        db.create_all()
        yield app
        db.session.remove()
        db.drop_all()
        db.engine.dispose()


@pytest.fixture
def executed(app: Flask) -> list[str]:
    """The statements the driver gets from now on (SQLite's own BEGIN and COMMIT left out)."""
    RECORDED.clear()
    return RECORDED


def _statements(recorded: list[str]) -> list[str]:
    return [s for s in recorded if s.split(None, 1)[0].upper() not in ("BEGIN", "COMMIT")]


def _is_postgres() -> bool:
    return db.engine.dialect.name == "postgresql"


def test_orm_statements_carry_the_tenant(app: Flask, executed: list[str]) -> None:
    with tenant_jobs.switch("acme"):
        db.session.add(Note(text="a"))
        db.session.commit()
        assert [n.text for n in db.session.scalars(sa.select(Note))] == ["a"]
        db.session.execute(sa.update(Note).values(text="b"))
        db.session.commit()
    statements = _statements(executed)
    assert statements and all(statement.endswith(ACME) for statement in statements), executed


def test_one_statement_carries_each_tenant_in_turn(app: Flask, executed: list[str]) -> None:
    """The commented form of a statement is kept per tenant and statement: the same
    statement run in acme, globex and with no tenant carries each one's comment, or none."""
    statement = sa.select(sa.literal(1))
    for tenant in ("acme", "globex", "acme", None, "globex"):
        executed.clear()
        if tenant is None:
            db.session.execute(statement)
            assert not any("/*" in s for s in executed), executed
            continue
        with tenant_jobs.switch(tenant):
            db.session.execute(statement)
        assert [s for s in _statements(executed) if "/*" in s] == [
            _statements(executed)[0].split(" /*")[0] + f" /*tenant='{tenant}'*/"
        ], executed


def test_no_tenant_no_comment(app: Flask, executed: list[str]) -> None:
    with tenant_jobs.without_tenant():
        db.session.scalars(sa.select(Note)).all()
    db.session.execute(sa.text("SELECT 1"))
    assert _statements(executed) and not any("/*" in s for s in executed), executed


def test_it_is_off_by_default(database_url: str) -> None:
    app = _recording_app(database_url)
    with app.app_context(), tenant_jobs.switch("acme"):
        db.session.execute(sa.text("SELECT 1"))
        RECORDED.clear()
        db.session.execute(sa.text("SELECT 2"))
        db.session.remove()
        db.engine.dispose()
    assert RECORDED == ["SELECT 2"]


def test_the_server_sees_the_comment(app: Flask) -> None:
    with tenant_jobs.switch("globex"):
        if _is_postgres():
            query = db.session.execute(sa.text("SELECT current_query()")).scalar_one()
        else:
            traced: list[str] = []
            connection = db.session.connection().connection.dbapi_connection
            connection.set_trace_callback(traced.append)  # type: ignore[union-attr]
            try:
                db.session.execute(sa.text("SELECT 1"))
            finally:
                connection.set_trace_callback(None)  # type: ignore[union-attr]
            (query,) = traced
    assert query.endswith(" /*tenant='globex'*/")


def test_executemany_and_bulk_inserts(app: Flask, executed: list[str]) -> None:
    with tenant_jobs.switch("acme"):
        db.session.add_all(Note(text=f"orm-{i}") for i in range(5))
        db.session.flush()
        db.session.execute(sa.insert(Note), [{"text": f"bulk-{i}"} for i in range(5)])
        db.session.commit()
        with db.engine.begin() as connection:
            connection.execute(
                sa.text("INSERT INTO obs_note (text, tenant_id) VALUES (:text, 'acme')"),
                [{"text": f"core-{i}"} for i in range(5)],
            )
        texts = sorted(n.text for n in db.session.scalars(sa.select(Note)))
    assert texts == sorted([f"{kind}-{i}" for kind in ("orm", "bulk", "core") for i in range(5)])
    inserts = [s for s in executed if s.startswith("INSERT")]
    assert len(inserts) >= 3
    assert inserts and all(s.endswith(ACME) and s.count("/*") == 1 for s in inserts), inserts


def test_streamed_results(app: Flask, executed: list[str]) -> None:
    """``yield_per`` streams through a server-side cursor on PostgreSQL (a DECLARE)."""
    with tenant_jobs.switch("acme"):
        db.session.add_all(Note(text=f"n{i}") for i in range(5))
        db.session.commit()
        RECORDED.clear()
        streamed = db.session.scalars(sa.select(Note.text).execution_options(yield_per=2))
        assert sorted(streamed) == [f"n{i}" for i in range(5)]
    selects = [s for s in _statements(executed) if "obs_note" in s]
    assert selects and all(s.endswith(ACME) for s in selects), executed


@pytest.mark.parametrize(
    ("sql", "sent"),
    [
        ("SELECT 1 AS one /* a comment of its own */",
         "SELECT 1 AS one /* a comment of its own */" + ACME),
        ("SELECT 1 AS one;", "SELECT 1 AS one" + ACME + ";"),
        ("SELECT 1 AS one ;  \n", "SELECT 1 AS one " + ACME + ";"),
        ("SELECT 1 AS one -- a line comment", "SELECT 1 AS one -- a line comment" + ACME),
        ("SELECT '/*' AS one", "SELECT '/*' AS one" + ACME),
    ],
)
def test_statements_with_comments_and_semicolons(
    app: Flask, executed: list[str], sql: str, sent: str
) -> None:
    with tenant_jobs.switch("acme"):
        row = db.session.execute(sa.text(sql)).one()
    assert _statements(executed)[-1] == sent
    assert row[0] in (1, "/*")


def test_percent_signs_still_work(app: Flask) -> None:
    with tenant_jobs.switch("acme"):
        value = db.session.execute(
            sa.text("SELECT '100%' || :suffix"), {"suffix": "!"}
        ).scalar_one()
    assert value == "100%!"


HOSTILE = "x'*/; DROP TABLE obs_note; --%s%(id)s"


def test_the_value_is_escaped() -> None:
    comment = sql_comment(HOSTILE)
    assert comment == (
        " /*tenant='x%27%2A%2F%3B%20DROP%20TABLE%20obs_note%3B%20--%25s%25%28id%29s'*/"
    )
    assert comment.count("'") == 2 and comment.count("*/") == 1
    assert with_comment("SELECT 1;", comment) == "SELECT 1" + comment + ";"


def test_a_name_that_bypassed_validation_stays_inside_the_comment(
    app: Flask, executed: list[str]
) -> None:
    """Names are validated DNS labels; even one that is not cannot break out of the comment
    nor be read as a placeholder by psycopg (``%`` doubled for its paramstyle)."""
    with context.active(HOSTILE):  # no validation: the attacker's best case
        value = db.session.execute(sa.text("SELECT :v"), {"v": 7}).scalar_one()
        count = db.session.execute(sa.text("SELECT count(*) FROM obs_note")).scalar_one()
        received = (
            db.session.execute(sa.text("SELECT current_query()")).scalar_one()
            if _is_postgres() else _statements(executed)[0]
        )
    assert (value, count) == (7, 0)  # the table is still there
    assert received.endswith(sql_comment(HOSTILE)), received


def test_statements_run_without_parameters(app: Flask, executed: list[str]) -> None:
    """``no_parameters`` hands the driver the bare string: ``%`` is not doubled there."""
    for name in ("acme", HOSTILE):
        with context.active(name), db.engine.connect() as connection:
            bare = connection.execution_options(no_parameters=True)
            received = bare.exec_driver_sql(
                "SELECT current_query()" if _is_postgres() else "SELECT '100%'"
            ).scalar_one()
            if _is_postgres():
                assert received.endswith(sql_comment(name)), received
    assert _statements(executed) == [
        ("SELECT current_query()" if _is_postgres() else "SELECT '100%'") + sql_comment(name)
        for name in ("acme", HOSTILE)
    ]


def test_the_compiled_cache_is_not_per_tenant(database_url: str) -> None:
    names = [f"t{i:02d}" for i in range(20)]
    app = observability_app.create_app(
        SQLALCHEMY_DATABASE_URI=database_url, TENANT_JOBS_SQL_COMMENT=True,
        TENANT_JOBS_TENANTS=names,
    )
    with app.app_context():
        db.drop_all()
        db.create_all()
        try:
            query = sa.select(Note).where(Note.text == "x")
            sizes = []
            for name in names:
                with tenant_jobs.switch(name):
                    db.session.scalars(query).all()
                    sizes.append(len(db.engine._compiled_cache))  # type: ignore[attr-defined]
            assert len(set(sizes)) == 1, sizes
        finally:
            db.session.remove()
            db.drop_all()


# -- PostgreSQL only -------------------------------------------------------------------------


@pytest.fixture
def prepared_app(postgres_url: str) -> t.Iterator[Flask]:
    """Comments on, and psycopg preparing every statement on the server at once."""
    app = observability_app.create_app(
        SQLALCHEMY_DATABASE_URI=postgres_url, TENANT_JOBS_SQL_COMMENT=True,
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"prepare_threshold": 0}, "pool_size": 1},
    )
    with app.app_context():
        db.drop_all()
        db.create_all()
        yield app
        db.session.remove()
        db.drop_all()


def test_server_side_prepared_statements(prepared_app: Flask) -> None:
    query = sa.select(Note.text).where(Note.text != "never")
    for name in ("acme", "globex", "acme", "globex"):
        with tenant_jobs.switch(name):
            if not db.session.scalars(query).all():
                db.session.add(Note(text=f"of {name}"))
                db.session.commit()
            assert db.session.scalars(query).all() == [f"of {name}"]
            db.session.commit()
    prepared = db.session.execute(
        sa.text("SELECT statement FROM pg_prepared_statements WHERE statement LIKE '%obs_note%'")
    ).scalars().all()
    db.session.commit()
    selects = [s for s in prepared if s.startswith("SELECT obs_note.text")]
    assert sorted(s.rsplit(" /*", 1)[1] for s in selects) == [
        "tenant='acme'*/", "tenant='globex'*/"
    ], prepared


def test_pg_stat_activity_shows_the_tenant(postgres_url: str) -> None:
    app = observability_app.create_app(
        SQLALCHEMY_DATABASE_URI=postgres_url, TENANT_JOBS_SQL_COMMENT=True
    )
    seen: list[str] = []

    def slow_query() -> None:
        with app.app_context(), tenant_jobs.switch("initech"):
            db.session.execute(sa.text("SELECT pg_sleep(0.6)"))
            db.session.remove()

    worker = threading.Thread(target=slow_query)
    with app.app_context():
        db.session.execute(sa.text("SELECT 1"))  # connected before the other thread starts
        worker.start()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            seen = list(db.session.execute(sa.text(
                "SELECT query FROM pg_stat_activity "
                "WHERE query LIKE 'SELECT pg_sleep%' AND pid <> pg_backend_pid()"
            )).scalars())
            db.session.commit()
        worker.join()
        db.session.remove()
    assert seen == ["SELECT pg_sleep(0.6) /*tenant='initech'*/"]


@pytest.fixture
def schema_app(postgres_url: str) -> t.Iterator[Flask]:
    app = _recording_app(
        postgres_url, TENANT_JOBS_SQL_COMMENT=True,
        TENANT_JOBS_STRATEGY="schema", TENANT_JOBS_SCHEMA_FORMAT=SCHEMA_FORMAT,
    )
    with app.app_context():
        for name in observability_app.TENANTS:
            tenant_jobs.drop(name)
            tenant_jobs.create(name)
        try:
            yield app
        finally:
            db.session.remove()
            for name in observability_app.TENANTS:
                tenant_jobs.drop(name)


def test_schema_strategy(schema_app: Flask) -> None:
    """The strategy's own ``set_config`` runs on a cursor of its own, uncommented; every
    statement of the app is commented, and each tenant still reads its own schema."""
    RECORDED.clear()
    for name in ("acme", "globex", "acme"):
        with tenant_jobs.switch(name):
            db.session.add(Note(text=f"of {name}"))
            db.session.flush()
            path = db.session.execute(sa.text("SHOW search_path")).scalar_one()
            assert path == f'"{SCHEMA_FORMAT.format(tenant=name)}", "public"'
            texts = set(db.session.scalars(sa.select(Note.text)))
            assert texts == {f"of {name}"}
            db.session.commit()
    set_paths = [s for s in RECORDED if "set_config('search_path'" in s]
    statements = [s for s in RECORDED if s not in set_paths]
    assert set_paths and not any("/*" in s for s in set_paths), set_paths
    assert statements and all(s.endswith("'*/") for s in statements), statements


def test_the_commented_statements_kept_are_bounded() -> None:
    """Each tenant's commented statements are kept (the same string object at each
    execution), at most ``_MAX_CACHED_STATEMENTS`` in all, whatever SQL an app runs."""
    comments = sqlcomment._Comments(escape_percent=False)
    limit = sqlcomment._MAX_CACHED_STATEMENTS
    first = comments.commented("acme", "SELECT 0")
    assert comments.kept["acme"]["SELECT 0"] is first
    for i in range(limit + 10):
        comments.commented("acme" if i % 2 else "globex", f"SELECT {i}")
        assert sum(len(kept) for kept in comments.kept.values()) <= limit
    assert comments.kept["globex"][f"SELECT {limit + 8}"] == (
        f"SELECT {limit + 8}" + sql_comment("globex")
    )
