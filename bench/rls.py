"""Row-level security on PostgreSQL: what the settings on every transaction cost.

A request-sized transaction: inside ``switch()``, three scoped ORM reads (10 rows
of a bucket, ``session.get()`` of one row, a count), then ``db.session.remove()``
as Flask-SQLAlchemy's teardown does. Measured with ``TENANT_JOBS_RLS`` on against
a table with the ``tenant_jobs_isolation`` policy, baseline the same app with it
off against an identical table without policies; both connect as the same role,
one that row-level security applies to (made for the run, dropped afterwards).

* on vs off: the settings ride in one round trip with the transaction's ``BEGIN``,
  and PostgreSQL evaluates the policy on every row read;
* the settings alone: ``TENANT_JOBS_RLS`` on against the table without policies,
  vs off (what the policy's check of every row read costs is the difference to
  the first row);
* the same with the settings sent in a round trip of their own before the first
  statement (the simple way, measured for comparison: this module swaps the
  riding ``BEGIN`` for it);
* a read in an open transaction that has switched tenants (``switch()`` into the
  next tenant before each read) vs the same read in a one-tenant transaction: such
  a transaction sends the settings before each statement, in a round trip of
  their own.

``BENCH_POSTGRES_URL`` names the database (its role must be able to create roles);
the tables ``bench_rls_*`` are dropped and re-created.
"""

from __future__ import annotations

import contextlib
import sys
import typing as t
from itertools import cycle

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs import TenantJobs, TenantScoped, rls

from . import Row, compare
from .core import POSTGRES_URL, postgres_reachable
from .rls_role import app_role

TENANTS = [f"t{i:02d}" for i in range(10)]
ROWS_PER_TENANT = 1000
BUCKETS = 100
TENANT = "t03"
RLS_TARGET = 1.15

protected_db = SQLAlchemy()
unprotected_db = SQLAlchemy()
tenant_jobs = TenantJobs()


class ProtectedItem(TenantScoped, protected_db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "bench_rls_protected"
    id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class UnprotectedItem(TenantScoped, unprotected_db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "bench_rls_unprotected"
    id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(sa.String(50))


def _app(db: SQLAlchemy, url: str, rls_on: bool) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=url,
        TENANT_JOBS_TENANTS=TENANTS,
        TENANT_JOBS_RLS=rls_on,
    )
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app


def _fill(owner_url: str) -> None:
    """Make and fill both tables as their owner; protect one of them."""
    rows = [
        {"tenant_id": tenant, "bucket": i % BUCKETS, "name": f"{tenant}-{i}"}
        for tenant in TENANTS
        for i in range(ROWS_PER_TENANT)
    ]
    for db, model in ((protected_db, ProtectedItem), (unprotected_db, UnprotectedItem)):
        app = _app(db, owner_url, rls_on=False)
        with app.app_context():
            db.drop_all()
            db.create_all()
            with db.engine.begin() as connection:
                connection.execute(sa.insert(model.__table__), rows)
                connection.exec_driver_sql(f"ANALYZE {model.__tablename__}")
            if db is protected_db:
                tenant_jobs.enable_rls()
            db.engine.dispose()


def _drop(owner_url: str) -> None:
    for db in (protected_db, unprotected_db):
        app = _app(db, owner_url, rls_on=False)
        with app.app_context():
            db.drop_all()
            db.engine.dispose()


def _request(db: SQLAlchemy, model: type[t.Any], pk: int) -> t.Callable[[], None]:
    """Three scoped reads in one transaction, then the request's teardown."""
    expected = ROWS_PER_TENANT // BUCKETS

    def transaction() -> None:
        session = db.session
        assert len(session.scalars(sa.select(model).where(model.bucket == 7)).all()) == expected
        assert session.get(model, pk) is not None
        assert session.scalar(sa.select(sa.func.count()).select_from(model)) == ROWS_PER_TENANT
        db.session.remove()

    return transaction


def _switched(db: SQLAlchemy, model: type[t.Any], switch: bool) -> t.Callable[[], None]:
    """One read in an open transaction, after a switch into the next tenant (or none)."""
    tenants = cycle(TENANTS)
    query = sa.select(sa.func.count()).select_from(model)

    def read() -> None:
        if switch:
            with tenant_jobs.switch(next(tenants)):
                assert db.session.scalar(query) == ROWS_PER_TENANT
        else:
            assert db.session.scalar(query) == ROWS_PER_TENANT

    return read


def _own_round_trip(dbapi: t.Any, values: tuple[str, str]) -> None:
    """What riding on ``BEGIN`` saves: the settings as a statement of their own."""
    rls._settings._send(dbapi, values)


@contextlib.contextmanager
def _settings_in_their_own_round_trip() -> t.Iterator[None]:
    rls._settings._begin_with = _own_round_trip  # type: ignore[method-assign]
    try:
        yield
    finally:
        del rls._settings._begin_with


def _rows(role_url: str, number: int, seconds: float) -> list[Row]:
    on = _app(protected_db, role_url, rls_on=True)
    off = _app(unprotected_db, role_url, rls_on=False)
    settings_only = _app(unprotected_db, role_url, rls_on=True)
    with on.app_context(), tenant_jobs.switch(TENANT):
        pk = protected_db.session.scalars(sa.select(ProtectedItem.id).limit(1)).one()
        protected_db.session.remove()
    with off.app_context(), tenant_jobs.switch(TENANT):
        plain_pk = unprotected_db.session.scalars(sa.select(UnprotectedItem.id).limit(1)).one()
        unprotected_db.session.remove()

    def in_tenant(app: Flask) -> t.Callable[[], t.ContextManager[None]]:
        @contextlib.contextmanager
        def entered() -> t.Iterator[None]:
            with app.app_context(), tenant_jobs.switch(TENANT):
                yield

        return entered

    @contextlib.contextmanager
    def on_in_own_round_trip() -> t.Iterator[None]:
        with _settings_in_their_own_round_trip(), in_tenant(on)():
            yield

    def in_transaction(app: Flask, db: SQLAlchemy) -> t.Callable[[], t.ContextManager[None]]:
        @contextlib.contextmanager
        def entered() -> t.Iterator[None]:
            with in_tenant(app)():
                db.session.connection()  # the transaction is open
                yield
                db.session.remove()

        return entered

    off_request = _request(unprotected_db, UnprotectedItem, plain_pk)
    on_request = _request(protected_db, ProtectedItem, pk)
    rows = [
        compare("RLS: request-sized transaction (3 scoped SELECTs), on vs off", off_request,
                on_request, number=number, seconds=seconds, target=RLS_TARGET,
                baseline_context=in_tenant(off), measured_context=in_tenant(on)),
        compare("RLS: same, the settings alone (a table without policies), on vs off",
                off_request, off_request, number=number, seconds=seconds,
                baseline_context=in_tenant(off), measured_context=in_tenant(settings_only)),
        compare("RLS: same, settings in a round trip of their own, on vs off", off_request,
                on_request, number=number, seconds=seconds,
                baseline_context=in_tenant(off), measured_context=on_in_own_round_trip),
        compare("RLS: 1 SELECT in a transaction that switches tenants vs in one tenant",
                _switched(protected_db, ProtectedItem, switch=False),
                _switched(protected_db, ProtectedItem, switch=True), number=number * 5,
                seconds=seconds,
                baseline_context=in_transaction(on, protected_db),
                measured_context=in_transaction(on, protected_db)),
    ]
    for app, db in ((on, protected_db), (off, unprotected_db), (settings_only, unprotected_db)):
        with app.app_context():
            db.engine.dispose()
    return rows


def run() -> list[Row]:
    """RLS on vs off (about 40 s)."""
    if not postgres_reachable(POSTGRES_URL):
        print(f"PostgreSQL not reachable at {POSTGRES_URL}: skipped", file=sys.stderr)
        return []
    _fill(POSTGRES_URL)
    try:
        with app_role(POSTGRES_URL) as role_url:
            return _rows(role_url, number=10, seconds=8.0)
    finally:
        _drop(POSTGRES_URL)
