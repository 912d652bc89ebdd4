"""The core's overhead: scoped ORM queries and tenant resolution vs hand-written equivalents.

* Queries: a ``TenantScoped`` model queried inside ``switch()`` (the library adds
  the ``tenant_id`` criteria) vs an identical plain model queried with a
  hand-written ``tenant_id`` filter through a second, untouched Flask-SQLAlchemy
  instance; both models map the same table (10 tenants x 1,000 rows), so both
  sides read the same pages with the same plan; on SQLite and, if it answers,
  PostgreSQL (autovacuum off on the table: an ANALYZE halfway through a row
  would change the plan of one side's batches).
* Requests: a view that does not touch the database, through the test client,
  with tenant resolution (subdomain) vs a plain Flask app; and with 10,000 tenants.

``BENCH_POSTGRES_URL`` names the PostgreSQL database (default: the ``root``
database on 127.0.0.1:5432); the tables ``bench_*`` are dropped and re-created.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs import TenantJobs, TenantScoped

from . import CORE_SETTINGS, Row, compare, without_autovacuum

TENANTS = [f"t{i:02d}" for i in range(10)]
ROWS_PER_TENANT = 1000
BUCKETS = 100  # a query for one bucket returns ROWS_PER_TENANT / BUCKETS = 10 rows
TENANT = "t03"
POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/root"
)
QUERY_TARGET = 1.10
REQUEST_TARGET = 1.10

scoped_db = SQLAlchemy()
plain_db = SQLAlchemy()  # no TenantJobs on it: its sessions have no tenant hooks
tenant_jobs = TenantJobs()


#: The one table both models map: the same rows, pages and query plan on both sides.
TABLE = "bench_items"


class ScopedItem(TenantScoped, scoped_db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class PlainItem(plain_db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    tenant_id: Mapped[str] = mapped_column(sa.String(63), index=True)  # last, as in the mixin


def _app(db: SQLAlchemy, url: str, tenants: list[str] | None) -> Flask:
    """An app on ``db``; with ``tenants``, TenantJobs too. Otherwise the apps are identical."""
    app = Flask(__name__)
    app.config.update(SERVER_NAME="example.test", SQLALCHEMY_DATABASE_URI=url)
    db.init_app(app)
    if tenants is not None:
        app.config.update(CORE_SETTINGS, TENANT_JOBS_TENANTS=tenants)
        tenant_jobs.init_app(app, db=db)
    app.add_url_rule("/ping", "ping", lambda: "pong")
    return app


def _fill(db: SQLAlchemy, model: type[t.Any]) -> None:
    db.drop_all()
    db.create_all()
    without_autovacuum(db.engine, model.__tablename__)
    rows = [
        {"tenant_id": tenant, "bucket": i % BUCKETS, "name": f"{tenant}-{i}"}
        for tenant in TENANTS
        for i in range(ROWS_PER_TENANT)
    ]
    with db.engine.begin() as connection:
        connection.execute(sa.insert(model.__table__), rows)


def _query_rows(label: str, url: str, number: int) -> list[Row]:
    scoped_app = _app(scoped_db, url, TENANTS)
    plain_app = _app(plain_db, url, None)
    with scoped_app.app_context():
        _fill(scoped_db, ScopedItem)
        with tenant_jobs.switch(TENANT):
            pk = scoped_db.session.scalars(sa.select(ScopedItem.id).limit(1)).one()

    @contextlib.contextmanager
    def in_tenant() -> t.Iterator[None]:
        with scoped_app.app_context(), tenant_jobs.switch(TENANT):
            yield

    expected = ROWS_PER_TENANT // BUCKETS
    scoped_stmt = sa.select(ScopedItem).where(ScopedItem.bucket == 7)
    plain_stmt = sa.select(PlainItem).where(PlainItem.bucket == 7, PlainItem.tenant_id == TENANT)

    def scoped_select_built() -> None:  # what a view does: build the statement, run it
        stmt = sa.select(ScopedItem).where(ScopedItem.bucket == 7)
        assert len(scoped_db.session.scalars(stmt).all()) == expected
        scoped_db.session.expunge_all()

    def plain_select_built() -> None:
        stmt = sa.select(PlainItem).where(PlainItem.bucket == 7, PlainItem.tenant_id == TENANT)
        assert len(plain_db.session.scalars(stmt).all()) == expected
        plain_db.session.expunge_all()

    def scoped_select_reused() -> None:
        assert len(scoped_db.session.scalars(scoped_stmt).all()) == expected
        scoped_db.session.expunge_all()

    def plain_select_reused() -> None:
        assert len(plain_db.session.scalars(plain_stmt).all()) == expected
        plain_db.session.expunge_all()

    def hand_get() -> PlainItem | None:
        item = plain_db.session.get(PlainItem, pk)
        return item if item is not None and item.tenant_id == TENANT else None

    def scoped_get_fresh() -> None:
        assert scoped_db.session.get(ScopedItem, pk) is not None
        scoped_db.session.expunge_all()

    def plain_get_fresh() -> None:
        assert hand_get() is not None
        plain_db.session.expunge_all()

    by_key = sa.select(PlainItem).where(PlainItem.id == sa.bindparam("pk"),
                                        PlainItem.tenant_id == sa.bindparam("tenant"))

    def plain_select_by_key() -> None:  # the tenant checked by the database, as get() does
        found = plain_db.session.scalars(by_key, {"pk": pk, "tenant": TENANT}).one_or_none()
        assert found is not None
        plain_db.session.expunge_all()

    held: list[object] = []  # the identity map holds objects weakly: keep them alive

    def scoped_get_held() -> None:
        item = scoped_db.session.get(ScopedItem, pk)
        assert item is not None
        if not held:
            held.append(item)

    def plain_get_held() -> None:
        item = hand_get()
        assert item is not None
        if not held:
            held.append(item)

    def fresh_hold(context: t.Callable[[], t.ContextManager[t.Any]]) -> t.Callable[[], t.Any]:
        @contextlib.contextmanager
        def entered() -> t.Iterator[None]:
            with context():
                held.clear()
                yield
            held.clear()

        return entered

    contexts: dict[str, t.Any] = {
        "baseline_context": plain_app.app_context,
        "measured_context": in_tenant,
    }
    rows = [
        compare(f"{label}: select 10 of 10,000 rows", plain_select_built, scoped_select_built,
                number=number, target=QUERY_TARGET, **contexts),
        compare(f"{label}: same, statement object reused", plain_select_reused,
                scoped_select_reused, number=number, target=QUERY_TARGET, **contexts),
        compare(f"{label}: session.get(), not in session", plain_get_fresh, scoped_get_fresh,
                number=number, target=QUERY_TARGET, **contexts),
        compare(f"{label}: session.get(), not in session, vs a SELECT by primary key and "
                "tenant_id", plain_select_by_key, scoped_get_fresh, number=number, **contexts),
        compare(f"{label}: session.get(), already in session", plain_get_held,
                scoped_get_held, number=number * 20,
                baseline_context=fresh_hold(plain_app.app_context),
                measured_context=fresh_hold(in_tenant)),
    ]
    with scoped_app.app_context():
        scoped_db.drop_all()
    for app, db in ((scoped_app, scoped_db), (plain_app, plain_db)):
        with app.app_context():
            db.engine.dispose()
    return rows


def _request_rows(number: int) -> list[Row]:
    url = "sqlite://"
    plain = _app(plain_db, url, None).test_client()
    tenant = _app(scoped_db, url, TENANTS).test_client()
    many = _app(scoped_db, url, [f"t{i:05d}" for i in range(10_000)]).test_client()

    def get(client: t.Any, host: str) -> t.Callable[[], None]:
        def request() -> None:
            response = client.get("/ping", headers={"Host": host})
            assert response.status_code == 200, response.status_code

        return request

    return [
        compare("request: subdomain resolution vs plain Flask", get(plain, "t03.example.test"),
                get(tenant, "t03.example.test"), number=number, target=REQUEST_TARGET),
        compare("request: 10,000 tenants vs plain Flask", get(plain, "t05000.example.test"),
                get(many, "t05000.example.test"), number=number, target=REQUEST_TARGET),
        compare("request: 10,000 tenants vs 10 tenants", get(tenant, "t03.example.test"),
                get(many, "t05000.example.test"), number=number, target=REQUEST_TARGET),
    ]


def postgres_reachable(url: str) -> bool:
    """Whether a connection to the PostgreSQL of ``url`` succeeds."""
    parsed = make_url(url)
    try:
        socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 5432), 2).close()
        engine = sa.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception:
        return False
    return True


def run() -> list[Row]:
    """All core benchmarks (about 20-30 s)."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += _query_rows("SQLite", f"sqlite:///{tmp}/bench.sqlite3", number=50)
    if postgres_reachable(POSTGRES_URL):
        rows += _query_rows("PostgreSQL", POSTGRES_URL, number=20)
    else:
        print(f"PostgreSQL not reachable at {POSTGRES_URL}: skipped", file=sys.stderr)
    rows += _request_rows(number=100)
    return rows
