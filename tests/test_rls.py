"""Row-level security on the real PostgreSQL, as a role that RLS applies to.

The tables are made and seeded by the tests' superuser (their owner), and
protected with ``enable_rls()``; the app under test connects as a role made
for this module (``bench/rls_role.py``: neither SUPERUSER nor BYPASSRLS) with
``TENANT_JOBS_RLS`` on. Every check here is SQL the ORM hooks never see
(``text()``, Core on ``db.engine``, a session of the user's own), so what
holds is the database's own wall. The app's pool holds ONE connection, so
each test reuses the same PostgreSQL session and anything left behind on it
would be seen.

Data: acme has notes a1, a2; globex has g1.
"""

from __future__ import annotations

import itertools
import typing as t
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool, StaticPool

from bench.rls_role import app_role
from flask_tenant_jobs import (
    ConfigurationError,
    InvalidTenantNameError,
    TenantJobs,
    TenantScoped,
    context,
    rls,
)
from flask_tenant_jobs.rls import POLICY, enable_statements

from .core_app import count_statements, make_app

pytestmark = [
    pytest.mark.postgres,
    # from the env.py that Flask-Migrate's "flask db init" writes
    pytest.mark.filterwarnings("ignore:'get_engine' is deprecated:DeprecationWarning"),
]

ONE_CONNECTION = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 5}
db = SQLAlchemy()
NOTES = sa.text("SELECT body FROM rls_note ORDER BY body")
TENANT_SETTING = sa.text("SELECT current_setting('flask_tenant_jobs.tenant', true)")


class Note(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "rls_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(sa.String(40))


class Topic(db.Model):  # type: ignore[name-defined,misc]
    """Shared: no tenant, no policy."""

    __tablename__ = "rls_topic"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40))


@pytest.fixture(scope="module")
def role_url(postgres_url: str) -> Iterator[str]:
    with app_role(postgres_url) as url:
        yield url


@pytest.fixture
def admin(postgres_url: str) -> Iterator[sa.Engine]:
    """The superuser, outside any app: sees every row (superusers skip policies)."""
    engine = sa.create_engine(postgres_url, poolclass=NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def owner(postgres_url: str, admin: sa.Engine) -> Iterator[Flask]:
    """The tables' owner (the superuser): makes, seeds and protects the tables."""
    app, tenant_jobs = make_app(db, postgres_url)
    with app.app_context():
        db.drop_all()
        db.create_all()
        tenant_jobs.enable_rls()
        db.engine.dispose()
    with admin.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO rls_note (tenant_id, body) VALUES (:tenant, :body)"),
            [{"tenant": "acme", "body": "a1"}, {"tenant": "acme", "body": "a2"},
             {"tenant": "globex", "body": "g1"}],
        )
        connection.execute(sa.text("INSERT INTO rls_topic (name) VALUES ('news')"))
    yield app
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


@pytest.fixture
def app(owner: Flask, role_url: str) -> Iterator[Flask]:
    """The app under test: the RLS role, ``TENANT_JOBS_RLS`` on, one pooled connection."""
    app, _ = make_app(db, role_url, TENANT_JOBS_RLS=True, SQLALCHEMY_ENGINE_OPTIONS=ONE_CONNECTION)
    with app.app_context():
        yield app
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def jobs(app: Flask) -> TenantJobs:
    return t.cast(TenantJobs, app.extensions["tenant_jobs"])


def every_row(admin: sa.Engine) -> list[tuple[str, str]]:
    with admin.connect() as connection:
        rows = connection.execute(sa.text("SELECT tenant_id, body FROM rls_note ORDER BY 2"))
        return [tuple(row) for row in rows]  # type: ignore[misc]


def refused(statement: t.Callable[[], object]) -> str:
    """Run ``statement``; return PostgreSQL's refusal (it must refuse)."""
    with pytest.raises(sa.exc.ProgrammingError) as raised:
        statement()
    assert isinstance(raised.value.orig, psycopg.errors.InsufficientPrivilege)
    return str(raised.value.orig)


# -- what each tenant sees and writes ------------------------------------------------------


def test_text_select_sees_only_the_current_tenant(jobs: TenantJobs) -> None:
    with jobs.switch("acme"):
        assert db.session.scalars(NOTES).all() == ["a1", "a2"]
        db.session.rollback()  # gives the one pooled connection back
        with db.engine.connect() as connection:  # Core on the user's own connection
            assert connection.scalars(NOTES).all() == ["a1", "a2"]
            assert connection.scalar(sa.text("SELECT count(*) FROM rls_note")) == 2
        with Session(db.engine) as session:  # a session of the user's own, no ORM hooks
            assert session.scalars(NOTES).all() == ["a1", "a2"]
            assert sorted(note.body for note in session.scalars(sa.select(Note))) == ["a1", "a2"]
            assert session.get(Note, 3) is None  # g1's primary key
    with jobs.switch("globex"):
        assert db.session.scalars(NOTES).all() == ["g1"]
        db.session.rollback()
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT body FROM rls_note").scalars().all() == [
                "g1"
            ]


def test_text_update_and_delete_reach_only_the_current_tenant(
    jobs: TenantJobs, admin: sa.Engine
) -> None:
    with jobs.switch("globex"), db.engine.begin() as connection:
        updated = connection.execute(sa.text("UPDATE rls_note SET body = body || '!'"))
        assert updated.rowcount == 1
        deleted = connection.execute(sa.text("DELETE FROM rls_note WHERE body LIKE 'a%'"))
        assert deleted.rowcount == 0
    assert every_row(admin) == [("acme", "a1"), ("acme", "a2"), ("globex", "g1!")]


def test_the_database_refuses_rows_for_another_tenant(jobs: TenantJobs, admin: sa.Engine) -> None:
    with jobs.switch("acme"):
        with db.engine.begin() as connection:
            insert = sa.text("INSERT INTO rls_note (tenant_id, body) VALUES (:tenant, :body)")
            connection.execute(insert, {"tenant": "acme", "body": "a3"})
        with db.engine.begin() as connection:
            message = refused(
                lambda: connection.execute(insert, {"tenant": "globex", "body": "forged"})
            )
        assert "row-level security" in message
        with db.engine.begin() as connection:  # moving a row to another tenant
            refused(lambda: connection.execute(sa.text("UPDATE rls_note SET tenant_id = 'globex'")))
        with Session(db.engine) as session:  # Core INSERT through a session of one's own
            refused(lambda: session.execute(
                sa.insert(Note.__table__).values(tenant_id="globex", body="forged")
            ))
    assert every_row(admin) == [("acme", "a1"), ("acme", "a2"), ("acme", "a3"), ("globex", "g1")]


def test_no_tenant_sees_nothing_and_writes_nothing(jobs: TenantJobs, admin: sa.Engine) -> None:
    assert jobs.current is None
    with db.engine.begin() as connection:
        assert connection.scalars(NOTES).all() == []
        assert connection.execute(sa.text("UPDATE rls_note SET body = 'x'")).rowcount == 0
        assert connection.execute(sa.text("DELETE FROM rls_note")).rowcount == 0
        assert connection.scalars(sa.text("SELECT name FROM rls_topic")).all() == ["news"]
    with db.engine.begin() as connection:
        refused(lambda: connection.execute(
            sa.text("INSERT INTO rls_note (tenant_id, body) VALUES ('acme', 'x')")
        ))
    assert len(every_row(admin)) == 3


def test_a_tenant_id_of_empty_text_is_no_tenant(jobs: TenantJobs, admin: sa.Engine) -> None:
    """With no tenant the setting reads '': a row whose tenant_id is '' stays invisible."""
    with admin.begin() as connection:
        connection.execute(sa.text("INSERT INTO rls_note (tenant_id, body) VALUES ('', 'e')"))
    with db.engine.connect() as connection:
        assert connection.scalar(TENANT_SETTING) == ""
        assert connection.scalars(NOTES).all() == []


def test_without_tenant_sees_and_writes_every_tenant(jobs: TenantJobs, admin: sa.Engine) -> None:
    with jobs.switch("acme"), jobs.without_tenant(), db.engine.begin() as connection:
        assert connection.scalars(NOTES).all() == ["a1", "a2", "g1"]
        connection.execute(
            sa.text("INSERT INTO rls_note (tenant_id, body) VALUES ('globex', 'g2')")
        )
    assert ("globex", "g2") in every_row(admin)


def test_the_orm_keeps_its_own_filter(jobs: TenantJobs) -> None:
    """The ORM criteria stay (the planner uses the tenant_id index through them)."""
    with jobs.switch("acme"), count_statements(db.engine) as sql:
        assert sorted(n.body for n in db.session.scalars(sa.select(Note))) == ["a1", "a2"]
    assert "tenant_id =" in sql.statements[-1]


def test_the_policy_reads_the_settings_once_per_statement(jobs: TenantJobs) -> None:
    """``(select current_setting(...))``: an InitPlan run once, not a call per row."""
    with jobs.switch("acme"), db.engine.connect() as connection:
        plan = "\n".join(connection.scalars(sa.text("EXPLAIN SELECT * FROM rls_note")))
    assert "InitPlan" in plan and "current_setting" not in plan.split("InitPlan")[0]


# -- the settings follow the tenant, and nothing survives a transaction ---------------------


def test_the_settings_follow_a_switch_inside_an_open_transaction(jobs: TenantJobs) -> None:
    with db.engine.begin() as connection:
        pid = connection.scalar(sa.text("SELECT pg_backend_pid()"))
        with jobs.switch("acme"):
            assert connection.scalars(NOTES).all() == ["a1", "a2"]
            with jobs.switch("globex"):
                assert connection.scalars(NOTES).all() == ["g1"]
            assert connection.scalars(NOTES).all() == ["a1", "a2"]
            with jobs.without_tenant():
                assert connection.scalars(NOTES).all() == ["a1", "a2", "g1"]
        assert connection.scalars(NOTES).all() == []
        assert connection.scalar(sa.text("SELECT pg_backend_pid()")) == pid  # one transaction


ROLLBACKS_TO_SAVEPOINT = {
    "SQL": "ROLLBACK TO SAVEPOINT s1",
    "SQL after a comment": "/* undo */ rollback  to s1",
    "SQL after another statement": "SELECT 1; ROLLBACK TO SAVEPOINT s1",
}


@pytest.mark.parametrize("how", ["begin_nested", *ROLLBACKS_TO_SAVEPOINT])
def test_a_savepoint_rollback_never_leaves_another_tenants_setting(
    jobs: TenantJobs, how: str
) -> None:
    """PostgreSQL restores the settings of before the savepoint, whatever the SQL that
    rolls back to it looks like (the stale-cache bug of django-tenants#1262)."""
    with db.engine.begin() as connection, jobs.switch("acme"):
        assert connection.scalars(NOTES).all() == ["a1", "a2"]
        if how == "begin_nested":
            savepoint = connection.begin_nested()
        else:
            connection.exec_driver_sql("SAVEPOINT s1")
        with jobs.switch("globex"):
            assert connection.scalars(NOTES).all() == ["g1"]  # globex set inside it
            if how == "begin_nested":
                savepoint.rollback()  # PostgreSQL is back to acme's values
            else:
                connection.exec_driver_sql(ROLLBACKS_TO_SAVEPOINT[how])
            assert connection.scalar(TENANT_SETTING) == "globex"
            assert connection.scalars(NOTES).all() == ["g1"]
        assert connection.scalars(NOTES).all() == ["a1", "a2"]


def test_a_savepoint_rollback_in_a_one_tenant_transaction_restores_that_tenant(
    jobs: TenantJobs,
) -> None:
    with jobs.switch("acme"), db.engine.begin() as connection:
        connection.exec_driver_sql("SAVEPOINT s1")
        assert connection.scalars(NOTES).all() == ["a1", "a2"]
        connection.exec_driver_sql("ROLLBACK TO SAVEPOINT s1")
        assert connection.scalars(NOTES).all() == ["a1", "a2"]


def test_a_failed_statement_in_a_savepoint_is_rolled_back_cleanly(jobs: TenantJobs) -> None:
    with jobs.switch("acme"), db.engine.begin() as connection:
        savepoint = connection.begin_nested()
        with jobs.switch("globex"):
            refused(lambda: connection.execute(
                sa.text("INSERT INTO rls_note (tenant_id, body) VALUES ('acme', 'x')")
            ))
        savepoint.rollback()
        assert connection.scalars(NOTES).all() == ["a1", "a2"]


def _next_checkout_carries_nothing(jobs: TenantJobs, pid: int) -> None:
    """The next user of the one pooled connection (no tenant) sees no tenant and no row."""
    assert jobs.current is None
    with db.engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        with raw.cursor() as cursor:  # past every hook: what the session itself holds
            cursor.execute(
                "SELECT pg_backend_pid(), current_setting('flask_tenant_jobs.tenant', true), "
                "current_setting('flask_tenant_jobs.unscoped', true)"
            )
            backend, tenant, unscoped = cursor.fetchone()
        raw.rollback()
        assert backend == pid  # the same connection
        assert tenant in ("", None) and unscoped in ("", None)
        assert connection.scalar(TENANT_SETTING) in ("", None)
        assert connection.scalar(
            sa.text("SELECT current_setting('flask_tenant_jobs.unscoped', true)")
        ) in ("", "off", None)
        assert connection.scalars(NOTES).all() == []


def _backend_pid() -> int:
    with db.engine.connect() as connection:
        return t.cast(int, connection.scalar(sa.text("SELECT pg_backend_pid()")))


def test_a_pooled_connection_carries_nothing_to_the_next_transaction(jobs: TenantJobs) -> None:
    pid = _backend_pid()
    with jobs.switch("acme"), db.engine.begin() as connection:  # committed
        assert connection.scalars(NOTES).all() == ["a1", "a2"]
    _next_checkout_carries_nothing(jobs, pid)
    with jobs.switch("acme"), jobs.without_tenant(), db.engine.connect() as connection:
        assert len(connection.scalars(NOTES).all()) == 3  # closed without commit: rolled back
    _next_checkout_carries_nothing(jobs, pid)
    with pytest.raises(ZeroDivisionError), jobs.switch("globex"), db.engine.begin() as connection:
        assert connection.scalars(NOTES).all() == ["g1"]
        raise ZeroDivisionError  # an exception: rolled back
    _next_checkout_carries_nothing(jobs, pid)
    with jobs.switch("globex"), db.engine.connect() as connection:  # a failed statement
        with pytest.raises(sa.exc.ProgrammingError):
            connection.execute(sa.text("SELECT * FROM rls_no_such_table"))
        connection.rollback()
    _next_checkout_carries_nothing(jobs, pid)
    with jobs.switch("acme"):  # db.session, committed and removed
        assert db.session.scalars(NOTES).all() == ["a1", "a2"]
        db.session.commit()
        db.session.remove()
    _next_checkout_carries_nothing(jobs, pid)
    autocommit = db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    with jobs.switch("acme"), autocommit as connection:
        assert connection.scalars(NOTES).all() == ["a1", "a2"]
    _next_checkout_carries_nothing(jobs, pid)


def test_autocommit_statements_each_carry_the_tenant(jobs: TenantJobs, admin: sa.Engine) -> None:
    """Each AUTOCOMMIT statement is its own transaction: the settings go with each one."""
    autocommit = db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    with autocommit as connection:
        with jobs.switch("acme"):
            assert connection.scalars(NOTES).all() == ["a1", "a2"]
            assert connection.scalars(NOTES).all() == ["a1", "a2"]
            connection.execute(
                sa.text("INSERT INTO rls_note (tenant_id, body) VALUES ('acme', 'a3')")
            )
            refused(lambda: connection.execute(
                sa.text("INSERT INTO rls_note (tenant_id, body) VALUES ('globex', 'x')")
            ))
        with jobs.switch("globex"):
            assert connection.scalars(NOTES).all() == ["g1"]
        assert connection.scalars(NOTES).all() == []
        assert connection.scalar(TENANT_SETTING) in ("", None)
    assert ("acme", "a3") in every_row(admin)


def test_streamed_and_executemany_statements_carry_the_tenant(jobs: TenantJobs) -> None:
    with jobs.switch("globex"), db.engine.begin() as connection:
        streamed = connection.execute(NOTES, execution_options={"stream_results": True})
        assert streamed.scalars().all() == ["g1"]  # a server-side cursor
        insert = sa.text("INSERT INTO rls_note (tenant_id, body) VALUES (:tenant, :body)")
        connection.execute(insert, [{"tenant": "globex", "body": f"g{i}"} for i in (2, 3)])
        refused(lambda: connection.execute(
            insert, [{"tenant": "globex", "body": "g4"}, {"tenant": "acme", "body": "x"}]
        ))


def test_the_transactions_keep_their_isolation_level_and_access_mode(jobs: TenantJobs) -> None:
    """The BEGIN that carries the settings is the one psycopg would send."""
    serializable = db.engine.connect().execution_options(
        isolation_level="SERIALIZABLE", postgresql_readonly=True
    )
    with jobs.switch("acme"), serializable as connection:
        assert connection.scalars(NOTES).all() == ["a1", "a2"]
        assert connection.scalar(sa.text("SHOW transaction_isolation")) == "serializable"
        assert connection.scalar(sa.text("SHOW transaction_read_only")) == "on"


def test_threads_in_different_tenants_share_an_engine(owner: Flask, role_url: str) -> None:
    app, jobs = make_app(
        db, role_url, TENANT_JOBS_RLS=True,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 4, "max_overflow": 0, "pool_timeout": 30},
    )
    seen: list[tuple[str, list[str]]] = []

    def work(i: int) -> None:
        tenant = ("acme", "globex")[i % 2]
        with app.app_context(), jobs.switch(tenant), db.engine.begin() as connection:
            seen.append((tenant, connection.scalars(NOTES).all()))
            with jobs.switch(("globex", "acme")[i % 2]):
                seen.append((("globex", "acme")[i % 2], connection.scalars(NOTES).all()))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(400)))
    expected = {"acme": ["a1", "a2"], "globex": ["g1"]}
    assert len(seen) == 800
    assert all(bodies == expected[tenant] for tenant, bodies in seen)
    with app.app_context():
        db.engine.dispose()


class TransactionPooler:
    """A client connection of a transaction pooler (PgBouncer's ``pool_mode = transaction``):
    each transaction runs on the next of several server sessions, which other clients use
    between this client's transactions. The sessions are psycopg connections."""

    def __init__(self, sessions: list[psycopg.Connection[t.Any]]) -> None:
        object.__setattr__(self, "_all", sessions)
        object.__setattr__(self, "_sessions", itertools.cycle(sessions))
        object.__setattr__(self, "_session", next(self._sessions))

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._session, name)

    def __setattr__(self, name: str, value: t.Any) -> None:
        for session in self._all:  # e.g. autocommit: for whichever session comes next
            setattr(session, name, value)

    def _end(self, end: t.Callable[[], None]) -> None:
        """End the transaction; if one was open, the next runs on the next session."""
        was_open = self._session.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        end()
        if was_open:
            object.__setattr__(self, "_session", next(self._sessions))

    def commit(self) -> None:
        self._end(self._session.commit)

    def rollback(self) -> None:
        self._end(self._session.rollback)

    def close(self) -> None:
        """The server sessions belong to the pooler."""


def test_transaction_pooling_is_safe_by_construction(
    owner: Flask, role_url: str, admin: sa.Engine
) -> None:
    """Two clients on two server sessions, each transaction on the next session: every
    transaction sees its tenant only, whatever ran on its session before."""
    url = sa.engine.make_url(role_url).set(drivername="postgresql")
    sessions = [psycopg.connect(url.render_as_string(False)) for _ in range(2)]
    clients = []
    for order in (sessions, sessions[::-1]):
        options = {"creator": lambda order=order: TransactionPooler(order),
                   "poolclass": StaticPool, "use_native_hstore": False}
        clients.append(make_app(db, role_url, TENANT_JOBS_RLS=True,
                                SQLALCHEMY_ENGINE_OPTIONS=options))
    expected = {"acme": ["a1", "a2"], "globex": ["g1"], None: []}
    served: dict[int, set[tuple[int, str | None]]] = {}
    plan = itertools.product(["acme", None, "globex", "acme", None], range(2))
    for step, (tenant, client) in enumerate(plan):
        app, jobs = clients[client]
        with app.app_context(), jobs.switch(tenant), db.engine.begin() as connection:
            pid = connection.scalar(sa.text("SELECT pg_backend_pid()"))
            assert connection.scalars(NOTES).all() == expected[tenant], (step, client, tenant)
            served.setdefault(pid, set()).add((client, tenant))
            if step % 3 == 0:  # a savepoint rolled back on the way
                connection.begin_nested().rollback()
                assert connection.scalars(NOTES).all() == expected[tenant]
    assert len(served) == 2  # both sessions served ...
    assert all(len({c for c, _ in uses}) == 2 for uses in served.values())  # ... both clients
    for app, _ in clients:
        with app.app_context():
            db.engine.dispose()
    for session in sessions:
        session.close()


# -- bad input -------------------------------------------------------------------------------


def test_a_hostile_tenant_value_is_only_ever_a_value(jobs: TenantJobs, admin: sa.Engine) -> None:
    """Quoted by libpq where it rides on ``BEGIN``, a bound parameter elsewhere: quotes,
    backslashes and non-ASCII text reach the setting as they are and run no SQL."""
    with pytest.raises(InvalidTenantNameError), jobs.switch("acme'; DROP TABLE rls_note; --"):
        pass
    hostile = "x\\', true); DROP TABLE rls_note; SELECT set_config('a', 'b \u00fc\u4e2d"
    token = context.enter(hostile)  # past validation, as if a bug let it through
    try:
        with db.engine.connect() as connection:
            assert connection.scalars(NOTES).all() == []
            assert connection.scalar(TENANT_SETTING) == hostile
    finally:
        context.leave(token)
    assert len(every_row(admin)) == 3


def test_a_tenant_holding_a_nul_character_reads_nothing(jobs: TenantJobs) -> None:
    """Regression: past validation, ``acme\\x00`` reached PostgreSQL as ``acme`` (libpq
    cuts text at a NUL), so SQL text read acme's rows. It is refused before any SQL."""
    token = context.enter("acme\x00")  # past validation, as if a bug let it through
    try:
        with pytest.raises(InvalidTenantNameError), db.engine.connect() as connection:
            connection.scalars(NOTES).all()
    finally:
        context.leave(token)


def test_other_drivers_are_refused() -> None:
    """psycopg 3 only (libpq's pipeline mode); psycopg2 is not installed, so a stand-in."""
    engine = SimpleNamespace(
        url=sa.engine.make_url("postgresql+psycopg2://app:secret@db/shop"),
        dialect=SimpleNamespace(name="postgresql", driver="psycopg2"),
    )
    with pytest.raises(ConfigurationError) as raised:
        rls._check_driver(t.cast(sa.Engine, engine))
    assert str(raised.value) == (
        "'TENANT_JOBS_RLS' needs the psycopg 3 driver, but "
        "'postgresql+psycopg2://app:***@db/shop' uses 'psycopg2': use a "
        "'postgresql+psycopg://' URL."
    )


@pytest.mark.parametrize(
    ("url_kind", "config", "message"),
    [
        ("sqlite", {}, "needs PostgreSQL"),
        ("postgres", {"TENANT_JOBS_STRATEGY": "schema"}, "for the column strategy"),
        ("postgres", {"TENANT_JOBS_REQUIRE_TENANT": False}, "fails closed"),
    ],
)
def test_rls_settings_that_cannot_work_are_refused_at_init_app(
    postgres_url: str, url_kind: str, config: dict[str, t.Any], message: str
) -> None:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite://" if url_kind == "sqlite" else postgres_url,
        SERVER_NAME="example.test", TENANT_JOBS_TENANTS=["acme"], TENANT_JOBS_RLS=True,
        **config,
    )
    other_db = SQLAlchemy()
    other_db.init_app(app)
    with pytest.raises(ConfigurationError, match=message):
        TenantJobs(app, db=other_db)


# -- enable, disable, check ------------------------------------------------------------------


def test_enable_is_idempotent_and_check_is_clean(jobs: TenantJobs, owner: Flask) -> None:
    owner_jobs = owner.extensions["tenant_jobs"]
    with owner.app_context():
        assert owner_jobs.enable_rls() == ["rls_note"]
        assert owner_jobs.enable_rls() == ["rls_note"]
    assert jobs.check_rls() == []
    with db.engine.connect() as connection:
        policies = connection.scalars(sa.text(
            "SELECT polname FROM pg_policy WHERE polrelid = 'rls_note'::regclass"
        )).all()
    assert policies == [POLICY]


def test_check_names_a_role_that_skips_policies(owner: Flask, role_url: str,
                                                admin: sa.Engine) -> None:
    with owner.app_context():  # the superuser
        problems = owner.extensions["tenant_jobs"].check_rls()
    assert any("superuser" in p and "SUPERUSER" in p for p in problems), problems
    role = sa.engine.make_url(role_url).username
    with admin.begin() as connection:
        connection.exec_driver_sql(f"ALTER ROLE {role} BYPASSRLS")
    try:
        app, jobs = make_app(db, role_url, TENANT_JOBS_RLS=True)
        with app.app_context():
            problems = jobs.check_rls()
            with jobs.switch("acme"), db.engine.connect() as connection:
                assert len(connection.scalars(NOTES).all()) == 3  # it does skip them
            db.engine.dispose()
        assert problems == [
            f"The database role {role!r} has BYPASSRLS, so no policy applies to it: run "
            f"'ALTER ROLE {role} NOBYPASSRLS' or connect as another role."
        ]
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"ALTER ROLE {role} NOBYPASSRLS")


def test_check_names_each_unprotected_table_and_what_to_do(
    jobs: TenantJobs, admin: sa.Engine
) -> None:
    with admin.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE rls_note NO FORCE ROW LEVEL SECURITY")
        connection.exec_driver_sql(
            "CREATE POLICY everyone ON rls_note AS PERMISSIVE FOR SELECT USING (true)"
        )
    problems = jobs.check_rls()
    assert problems == [
        "Table 'rls_note' does not FORCE row-level security, so its owner bypasses the "
        "policy: run 'flask tenant-jobs rls enable' (or enable_rls_on(op, ...) in a migration).",
        "Table 'rls_note' has other permissive policies (everyone); a row that any "
        "permissive policy admits is visible, so they widen 'tenant_jobs_isolation': make "
        "them AS RESTRICTIVE, or drop them.",
    ]
    with admin.begin() as connection:
        connection.exec_driver_sql("DROP POLICY everyone ON rls_note")
        connection.exec_driver_sql(f"DROP POLICY {POLICY} ON rls_note")
        connection.exec_driver_sql(
            f"CREATE POLICY {POLICY} ON rls_note USING (true) WITH CHECK (true)"
        )
    assert [p.split(":")[0] for p in jobs.check_rls()] == [
        "Table 'rls_note' does not FORCE row-level security, so its owner bypasses the policy",
        "Table 'rls_note' has a 'tenant_jobs_isolation' policy that is not the one "
        "enable_rls() makes",
    ]


def test_disable_undoes_enable(jobs: TenantJobs, owner: Flask) -> None:
    with owner.app_context():
        assert owner.extensions["tenant_jobs"].disable_rls() == ["rls_note"]
        assert owner.extensions["tenant_jobs"].disable_rls() == ["rls_note"]
    assert jobs.check_rls() == [
        "Table 'rls_note' does not have row-level security enabled: run 'flask tenant-jobs "
        "rls enable' (or enable_rls_on(op, ...) in a migration).",
        "Table 'rls_note' does not FORCE row-level security, so its owner bypasses the "
        "policy: run 'flask tenant-jobs rls enable' (or enable_rls_on(op, ...) in a migration).",
        "Table 'rls_note' has no 'tenant_jobs_isolation' policy: run 'flask tenant-jobs rls "
        "enable' (or enable_rls_on(op, ...) in a migration).",
    ]
    with db.engine.connect() as connection:  # no wall any more: every row
        assert connection.scalars(NOTES).all() == ["a1", "a2", "g1"]


def test_check_with_the_setting_off_and_missing_tables(postgres_url: str, role_url: str) -> None:
    app, jobs = make_app(db, role_url)  # TENANT_JOBS_RLS off, tables not made
    with app.app_context():
        problems = jobs.check_rls()
        with pytest.raises(ConfigurationError, match="'rls_note' do not exist yet"):
            jobs.enable_rls()
        db.engine.dispose()
    assert problems == [
        "'TENANT_JOBS_RLS' is off, so transactions carry no tenant and the policies admit "
        "no tenant row: set it to True.",
        "Table 'rls_note' does not exist: create it, then run 'flask tenant-jobs rls enable' "
        "(or enable_rls_on(op, ...) in a migration).",
    ]


def test_check_names_tenant_tables_without_a_tenant_id(postgres_url: str) -> None:
    """Joined inheritance: the subclass table has no tenant_id, so no policy fits it."""
    inherited = SQLAlchemy()

    class Person(TenantScoped, inherited.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "rls_person"
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str] = mapped_column(sa.String(10))
        __mapper_args__: t.ClassVar[dict[str, t.Any]] = {"polymorphic_on": "kind",
                                                          "polymorphic_identity": "person"}

    class Manager(Person):
        __tablename__ = "rls_manager"
        id: Mapped[int] = mapped_column(sa.ForeignKey("rls_person.id"), primary_key=True)
        __mapper_args__: t.ClassVar[dict[str, t.Any]] = {"polymorphic_identity": "manager"}

    app, jobs = make_app(inherited, postgres_url, TENANT_JOBS_RLS=True)
    with app.app_context():
        inherited.create_all()
        try:
            assert jobs.enable_rls() == ["rls_person"]
            problems = jobs.check_rls()
        finally:
            inherited.drop_all()
            inherited.engine.dispose()
    assert problems[-1] == (
        "Table 'rls_manager' of the tenant-scoped model Manager has no 'tenant_id' column, so "
        "no policy can protect its rows: read it only through the ORM, or give it a tenant_id "
        "column of its own and protect it."
    )


def test_the_cli_commands(role_url: str, owner: Flask) -> None:
    """``flask tenant-jobs rls ...``; the owner's app (the superuser) changes the policies."""
    owner_cli = owner.test_cli_runner()
    app, _ = make_app(db, role_url, TENANT_JOBS_RLS=True)
    app_cli = app.test_cli_runner()
    result = app_cli.invoke(args=["tenant-jobs", "rls", "enable"])
    assert (result.exit_code, result.output) == (
        1, "Error: Changing the row-level security of table 'rls_note' needs its owner, and "
        f"the role {sa.engine.make_url(role_url).username!r} is not: run it with the owner's "
        "database URL (the role that runs your migrations).\n"
    )
    result = owner_cli.invoke(args=["tenant-jobs", "rls", "disable"])
    assert (result.exit_code, result.output) == (
        0, "row-level security disabled on 1 tables: rls_note\n"
    )
    result = app_cli.invoke(args=["tenant-jobs", "rls", "check"])
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith(
        "Table 'rls_note' does not have row-level security enabled"
    )
    result = owner_cli.invoke(args=["tenant-jobs", "rls", "enable"])
    assert (result.exit_code, result.output) == (
        0, "row-level security enabled on 1 tables: rls_note\n"
    )
    result = app_cli.invoke(args=["tenant-jobs", "rls", "check"])
    assert (result.exit_code, result.output) == (
        0, "row-level security: every tenant table is protected\n"
    )
    result = owner_cli.invoke(args=["tenant-jobs", "rls", "check"])
    assert result.exit_code == 1 and "is a superuser" in result.output
    with app.app_context():
        db.engine.dispose()


def test_cli_errors_are_one_line(postgres_url: str) -> None:
    app, _ = make_app(db, postgres_url)  # tables not made
    result = app.test_cli_runner().invoke(args=["tenant-jobs", "rls", "enable"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: The tenant table(s) 'rls_note' do not exist yet")
    with app.app_context():
        db.engine.dispose()


def test_enable_statements_quote_identifiers() -> None:
    statements = enable_statements("order", schema='we"ird')
    assert statements[0] == 'ALTER TABLE "we""ird"."order" ENABLE ROW LEVEL SECURITY'
    assert all(" ON \"we\"\"ird\".\"order\"" in s for s in statements[2:])


# -- Alembic through Flask-Migrate -------------------------------------------------------------

MIGRATION = '''"""rls_mig_doc, a tenant table"""
import sqlalchemy as sa
from alembic import op

from flask_tenant_jobs.rls import disable_rls_on, enable_rls_on

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "rls_mig_doc",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.String(63), nullable=False, index=True),
        sa.Column("title", sa.String(40)),
    )
    enable_rls_on(op, "rls_mig_doc")


def downgrade():
    disable_rls_on(op, "rls_mig_doc")
    op.drop_table("rls_mig_doc")
'''
migrated = SQLAlchemy()


class MigratedDoc(TenantScoped, migrated.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "rls_mig_doc"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(40))


def test_a_flask_migrate_revision_protects_its_table(
    postgres_url: str, role_url: str, tmp_path: Path
) -> None:
    from flask_migrate import Migrate, downgrade, upgrade

    owner, _ = make_app(migrated, postgres_url)
    directory = tmp_path / "migrations"
    Migrate(owner, migrated, directory=str(directory))
    result = owner.test_cli_runner().invoke(args=["db", "init"])
    assert result.exit_code == 0, result.output
    env = directory / "env.py"
    env.write_text(env.read_text().replace("fileConfig(config.config_file_name)", "pass"))
    (directory / "versions" / "0001.py").write_text(MIGRATION)
    with owner.app_context():
        upgrade(directory=str(directory))
        migrated.engine.dispose()
    app, jobs = make_app(migrated, role_url, TENANT_JOBS_RLS=True)
    try:
        with app.app_context():
            assert jobs.check_rls() == []
            with jobs.switch("acme"):
                migrated.session.add(MigratedDoc(title="a"))
                migrated.session.commit()
                with migrated.engine.begin() as connection:
                    refused(lambda: connection.execute(sa.text(
                        "INSERT INTO rls_mig_doc (tenant_id, title) VALUES ('globex', 'x')"
                    )))
            with jobs.switch("globex"), migrated.engine.connect() as connection:
                assert connection.scalars(sa.text("SELECT title FROM rls_mig_doc")).all() == []
            migrated.session.remove()
            migrated.engine.dispose()
    finally:
        with owner.app_context():
            downgrade(directory=str(directory), revision="base")
            with migrated.engine.begin() as connection:
                connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
            migrated.engine.dispose()



def test_a_transaction_opened_at_checkout_still_gets_the_settings(
    owner: Flask, role_url: str
) -> None:
    """A pool ``checkout`` listener that runs SQL on the raw connection opens the transaction
    before the first statement: what the connection carried last time is forgotten at
    check-in, so the settings are sent in it all the same."""
    app, jobs = make_app(
        db, role_url, TENANT_JOBS_RLS=True, SQLALCHEMY_ENGINE_OPTIONS=ONE_CONNECTION
    )

    def look_at_the_connection(dbapi_connection: t.Any, *args: t.Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    with app.app_context(), jobs.switch("acme"):
        sa.event.listen(db.engine.pool, "checkout", look_at_the_connection)
        for _ in range(3):
            with db.engine.begin() as connection:
                assert connection.scalars(NOTES).all() == ["a1", "a2"]
        db.engine.dispose()


def test_sql_comments_do_not_keep_the_settings_from_being_sent(
    owner: Flask, role_url: str
) -> None:
    """``TENANT_JOBS_SQL_COMMENT`` runs each statement itself from a driver-execute hook,
    installed before row-level security's: the settings still go first."""
    app, jobs = make_app(
        db, role_url, TENANT_JOBS_RLS=True, TENANT_JOBS_SQL_COMMENT=True,
        SQLALCHEMY_ENGINE_OPTIONS=ONE_CONNECTION,
    )
    with app.app_context():
        for tenant, bodies in (("acme", ["a1", "a2"]), ("globex", ["g1"])):
            with jobs.switch(tenant), db.engine.begin() as connection:
                assert connection.scalars(NOTES).all() == bodies
                query = sa.text("SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                assert connection.scalar(query).endswith(f"/*tenant='{tenant}'*/")
        db.engine.dispose()
