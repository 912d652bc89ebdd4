"""The schema strategy on PostgreSQL: switching per transaction, creating and migrating schemas.

* Switch cost: a transaction doing one indexed SELECT (by primary key) through
  the strategy's engine, always in the same tenant and alternating over 10
  tenants (``switch()`` around each transaction), vs the same transaction on a
  plain engine with the table named by its schema. With a transaction-local
  ``search_path`` every transaction pays one ``set_config`` round trip, in the
  same tenant or not.
* Request-sized transaction: inside ``switch()``, three ORM reads (a page of 10
  rows, a ``session.get()``, a count over the tenant's 1,000 rows) and the
  session's removal, vs the same reads through a plain Flask-SQLAlchemy app whose
  transaction starts with a hand-written ``SET LOCAL search_path``; and one read
  in a transaction that has switched tenants (the path then goes before each of
  its statements) vs one in a one-tenant transaction. The round trips of each
  (libpq's ReadyForQuery messages, from its protocol trace) are printed too:
  they do not depend on the machine's load.
* Create: ``tenant_jobs.create()`` of ``BENCH_SCHEMAS`` tenant schemas (default
  1,000), each with the app's 3 tables, vs ``CREATE SCHEMA`` + ``create_all``
  by hand on a plain engine (a sample of at most 100).
* Migrate: ``flask tenant-jobs migrate`` (in-process, ``--jobs 1`` and
  ``--jobs 4``) over those schemas with nothing to do, vs the same check by
  hand (``create_all`` with ``checkfirst``) on a plain engine; target: well under
  a minute for 1,000 schemas on a 2-core machine.
* The same no-op migrate with Flask-Migrate installed: Alembic checks each
  schema's own ``alembic_version`` (one tenant at a time), vs the by-hand check.
* Drop: ``tenant_jobs.drop()`` of every schema vs ``DROP SCHEMA ... CASCADE``.

``BENCH_POSTGRES_URL`` names the database (default: ``root`` on 127.0.0.1:5432);
every schema made here is named ``ftjb<random>_...`` and dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import typing as t
import uuid
from itertools import cycle
from pathlib import Path

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs import TenantJobs

from . import Row, compare
from .core import POSTGRES_URL, postgres_reachable

SCHEMAS = int(os.environ.get("BENCH_SCHEMAS", "1000"))
HAND_SAMPLE = min(SCHEMAS, 100)
SWITCH_TENANTS = [f"s{i:02d}" for i in range(10)]
ROWS_PER_TENANT = 1000
PREFIX = f"ftjb{uuid.uuid4().hex[:6]}"
MIGRATE_SECONDS_TARGET = 60.0

db = SQLAlchemy()
plain_db = SQLAlchemy()  # no TenantJobs on it: the hand-written baseline
tenant_jobs = TenantJobs()


class BenchTenant(db.Model):  # type: ignore[name-defined,misc]
    __tenant_shared__ = True
    __tablename__ = "bench_schema_tenants"
    name: Mapped[str] = mapped_column(sa.String(63), primary_key=True)


class BenchItem(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class PlainItem(plain_db.Model):  # type: ignore[name-defined,misc]
    """``BenchItem`` of the baseline app: the same table, found through ``search_path``."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class BenchNote(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id"), index=True)
    text: Mapped[str] = mapped_column(sa.Text)


class BenchEvent(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20), index=True)


def _schema(tenant: str) -> str:
    return f"{PREFIX}_{tenant}"


def _app(url: str, tenants: list[str]) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        SERVER_NAME="example.test",
        TENANT_JOBS_STRATEGY="schema",
        TENANT_JOBS_TENANTS=tenants,
        TENANT_JOBS_SCHEMA_FORMAT=PREFIX + "_{tenant}",
    )
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app


def _switch_rows(app: Flask, plain: Engine, number: int) -> list[Row]:
    with app.app_context():
        for tenant in SWITCH_TENANTS:
            tenant_jobs.create(tenant)
            with tenant_jobs.switch(tenant), db.engine.begin() as connection:
                connection.execute(
                    sa.insert(BenchItem.__table__),
                    [{"id": i, "bucket": i % 100, "name": f"{tenant}-{i}"}
                     for i in range(ROWS_PER_TENANT)],
                )
        engine = db.engine
    scoped = sa.select(BenchItem.name).where(BenchItem.id == 7)
    qualified = sa.text(f'SELECT name FROM "{_schema("s03")}".items WHERE id = 7')
    tenants = cycle(SWITCH_TENANTS)

    def plain_transaction() -> None:
        with plain.begin() as connection:
            assert connection.execute(qualified).scalar_one() == "s03-7"

    def same_tenant() -> None:
        with engine.begin() as connection:
            assert connection.execute(scoped).scalar_one() == "s03-7"

    def alternating() -> None:
        tenant = next(tenants)
        with tenant_jobs.switch(tenant), engine.begin() as connection:
            assert connection.execute(scoped).scalar_one() == f"{tenant}-7"

    @contextlib.contextmanager
    def in_s03() -> t.Iterator[None]:
        with app.app_context(), tenant_jobs.switch("s03"):
            yield

    return [
        compare("schema: 1-SELECT transaction, same tenant vs plain engine",
                plain_transaction, same_tenant, number=number, measured_context=in_s03),
        compare("schema: same, switch() into 10 tenants in turn vs plain engine",
                plain_transaction, alternating, number=number,
                measured_context=app.app_context),
        compare("schema: switch() into 10 tenants in turn vs same tenant",
                same_tenant, alternating, number=number,
                baseline_context=in_s03, measured_context=app.app_context),
    ]


def _plain_app(url: str) -> Flask:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    plain_db.init_app(app)
    return app


def _reads(session: t.Any, model: type[t.Any]) -> None:
    """The three reads of a request: a page of 10 rows, one row by key, a count."""
    assert len(session.scalars(sa.select(model).where(model.bucket == 7)).all()) == 10
    assert session.get(model, 7) is not None
    assert session.scalar(sa.select(sa.func.count()).select_from(model)) == ROWS_PER_TENANT


def _request_rows(app: Flask, number: int) -> list[Row]:
    """A request-sized transaction and a switched one (the tenants of ``_switch_rows``)."""
    plain = _plain_app(POSTGRES_URL)
    set_local = sa.text(f'SET LOCAL search_path TO "{_schema("s03")}", public')
    tenants = cycle(SWITCH_TENANTS)
    count = sa.select(sa.func.count()).select_from(BenchItem)

    def by_hand() -> None:
        plain_db.session.execute(set_local)
        _reads(plain_db.session, PlainItem)
        plain_db.session.remove()

    def scoped() -> None:
        _reads(db.session, BenchItem)
        db.session.remove()

    def one_tenant_read() -> None:
        assert db.session.scalar(count) == ROWS_PER_TENANT

    def switched_read() -> None:
        with tenant_jobs.switch(next(tenants)):
            assert db.session.scalar(count) == ROWS_PER_TENANT

    @contextlib.contextmanager
    def in_s03() -> t.Iterator[None]:
        with app.app_context(), tenant_jobs.switch("s03"):
            yield

    @contextlib.contextmanager
    def in_open_transaction() -> t.Iterator[None]:
        with in_s03():
            db.session.connection()
            yield
            db.session.remove()

    with plain.app_context():
        hand_trips = _round_trips(plain_db, by_hand)
    with in_s03():
        scoped_trips = _round_trips(db, scoped)

        def switching() -> None:
            _reads(db.session, BenchItem)
            with tenant_jobs.switch("s04"):
                _reads(db.session, BenchItem)
            db.session.remove()

        switched_trips = _round_trips(db, switching)
    print(f"schema: round trips per request-sized transaction: by hand {hand_trips}, "
          f"schema strategy {scoped_trips}; the same reads twice, switching tenant between "
          f"them: {switched_trips}", file=sys.stderr)
    rows = [
        compare("schema: request-sized transaction (3 SELECTs) vs SET LOCAL search_path by hand",
                by_hand, scoped, number=number, seconds=6.0, baseline_context=plain.app_context,
                measured_context=in_s03),
        compare("schema: 1 SELECT in a transaction that switches tenants vs in one tenant",
                one_tenant_read, switched_read, number=number * 5, seconds=6.0,
                baseline_context=in_open_transaction, measured_context=in_open_transaction),
    ]
    with plain.app_context():
        plain_db.engine.dispose()
    return rows


def _round_trips(database: SQLAlchemy, work: t.Callable[[], None]) -> int:
    """How many round trips ``work`` makes on the session's connection (libpq's trace)."""
    dbapi = database.session.connection().connection.dbapi_connection
    database.session.remove()
    work()  # warm
    with tempfile.TemporaryFile("w+") as trace:
        dbapi.pgconn.trace(trace.fileno())  # type: ignore[union-attr]
        try:
            work()
        finally:
            dbapi.pgconn.untrace()  # type: ignore[union-attr]
        trace.seek(0)
        return sum(1 for line in trace if "\tB\t" in line and "ReadyForQuery" in line)


def _lifecycle_rows(app: Flask, plain: Engine) -> list[Row]:
    names = [f"t{i:04d}" for i in range(SCHEMAS)]
    tables = [table for table in db.metadata.sorted_tables if table is not BenchTenant.__table__]

    def create_by_hand(schema: str) -> None:
        with plain.begin() as connection:
            connection.execute(sa.schema.CreateSchema(schema))
            translated = connection.execution_options(schema_translate_map={None: schema})
            db.metadata.create_all(translated, tables=tables)

    def drop_by_hand(schema: str) -> None:
        with plain.begin() as connection:
            connection.execute(sa.schema.DropSchema(schema, cascade=True))

    hand = [f"{PREFIX}_hand{i:04d}" for i in range(HAND_SAMPLE)]
    with app.app_context():
        hand_create, create_total = _interleaved(names, tenant_jobs.create, hand, create_by_hand)

        def check_by_hand() -> None:
            for name in names:
                with plain.begin() as connection:
                    translated = connection.execution_options(
                        schema_translate_map={None: _schema(name)}
                    )
                    db.metadata.create_all(translated, tables=tables)

        hand_migrate = _per_op(check_by_hand, len(names))
        migrate_totals = {
            f"--jobs {jobs}": _migrate(app, "--jobs", str(jobs)) for jobs in (1, 4)
        }
    with tempfile.TemporaryDirectory() as directory:
        alembic_total = _alembic_migrate(plain, Path(directory), names)
    if alembic_total is not None:
        migrate_totals["with Flask-Migrate (Alembic)"] = alembic_total

    with app.app_context():
        hand_drop, drop_total = _interleaved(names, tenant_jobs.drop, hand, drop_by_hand)

    count = f"{SCHEMAS:,}"
    rows = [
        _total_row(f"schema: create {count} schemas x 3 tables vs by hand",
                   hand_create, create_total, SCHEMAS),
    ]
    for how, total in migrate_totals.items():
        rows.append(_total_row(
            f"schema: no-op migrate of {count} schemas, CLI {how}, vs by hand",
            hand_migrate, total, SCHEMAS + len(SWITCH_TENANTS),
        ))
    rows.append(_total_row(f"schema: drop {count} schemas vs by hand", hand_drop,
                           drop_total, SCHEMAS))
    for how, total in migrate_totals.items():
        if total > MIGRATE_SECONDS_TARGET * SCHEMAS / 1000:
            print(f"migrate {how} took {total:.1f} s: over the target", file=sys.stderr)
    return rows


def _migrate(app: Flask, *options: str) -> float:
    """Seconds taken by ``flask tenant-jobs migrate`` (in-process) over every tenant."""
    started = time.perf_counter()
    result = app.test_cli_runner().invoke(args=["tenant-jobs", "migrate", *options])
    took = time.perf_counter() - started
    expected = f"migrated {SCHEMAS + len(SWITCH_TENANTS)} of "
    assert result.exit_code == 0 and expected in result.output, result.output[-500:]
    return took


def _alembic_migrate(plain: Engine, directory: Path, names: list[str]) -> float | None:
    """The no-op migrate through Flask-Migrate: every schema already at the head revision."""
    try:
        from flask_migrate import Migrate
    except ImportError:
        print("Flask-Migrate is not installed: the Alembic row is skipped", file=sys.stderr)
        return None
    app = _app(POSTGRES_URL, [*SWITCH_TENANTS, *names])
    migrations = directory / "migrations"
    Migrate(app, db, directory=str(migrations))
    result = app.test_cli_runner().invoke(args=["db", "init"])
    assert result.exit_code == 0, result.output
    env = migrations / "env.py"
    env.write_text(env.read_text().replace("fileConfig(config.config_file_name)", "pass"))
    (migrations / "versions" / "0001.py").write_text(
        'revision = "0001"\ndown_revision = None\n\n\ndef upgrade():\n    pass\n'
    )
    for tenant in [*SWITCH_TENANTS, *names]:  # at head already: stamped by hand
        with plain.begin() as connection:
            table = f'"{_schema(tenant)}".alembic_version'
            connection.execute(sa.text(f"CREATE TABLE {table} (version_num varchar(32))"))
            connection.execute(sa.text(f"INSERT INTO {table} VALUES ('0001')"))
    with app.app_context():
        took = _migrate(app)
        db.engine.dispose()
    return took


def _interleaved(
    names: list[str],
    measured: t.Callable[[str], object],
    hand: list[str],
    by_hand: t.Callable[[str], object],
) -> tuple[float, float]:
    """Run ``measured`` on every name and ``by_hand`` on every ``hand`` schema, spread among
    them (so both see the catalog at the same sizes); return the seconds per ``by_hand``
    call and the total seconds of ``measured``."""
    step = max(1, len(names) // len(hand))
    pending = list(hand)
    hand_seconds = measured_seconds = 0.0
    for i, name in enumerate(names):
        started = time.perf_counter()
        measured(name)
        measured_seconds += time.perf_counter() - started
        if i % step == 0 and pending:
            started = time.perf_counter()
            by_hand(pending.pop())
            hand_seconds += time.perf_counter() - started
    assert not pending
    return hand_seconds / len(hand), measured_seconds


def _per_op(work: t.Callable[[], object], count: int) -> float:
    """Seconds per item of ``work`` over ``count`` items."""
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) / count


def _total_row(name: str, baseline_per_op: float, measured_total: float, count: int) -> Row:
    measured_per_op = measured_total / count
    return Row(
        f"{name} ({measured_total:.1f} s in all)",
        baseline_per_op * 1e6,
        measured_per_op * 1e6,
        measured_per_op / baseline_per_op,
    )


def _drop_leftovers(plain: Engine) -> None:
    with plain.connect() as connection:
        schemas = connection.scalars(
            sa.text("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, :prefix)"),
            {"prefix": PREFIX},
        ).all()
    for schema in schemas:
        with plain.begin() as connection:
            connection.execute(sa.schema.DropSchema(schema, cascade=True))


#: The catalogs that creating and dropping thousands of tables leaves full of dead rows.
_BLOATED_CATALOGS = ("pg_attribute", "pg_attrdef", "pg_class", "pg_constraint", "pg_depend",
                     "pg_index", "pg_namespace", "pg_sequence", "pg_trigger", "pg_type")


def _vacuum_catalogs(plain: Engine) -> None:
    """Vacuum the catalogs this module bloats (thousands of tables made and dropped per
    run), whose dead rows autovacuum had let grow to 440,000 in ``pg_attribute`` over
    a day's runs; with them, the row-level security row (policies looked up as each
    statement is planned) read 1.15x-1.26x, and 1.08x-1.14x once they were vacuumed.
    Without the privilege, PostgreSQL skips a catalog with a warning. The checkpoint
    writes what the DDL dirtied before the next module is timed: right after this
    module, the RLS row read 1.19x twice without it, 1.08x-1.12x in three runs with it."""
    with plain.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for catalog in _BLOATED_CATALOGS:
            connection.exec_driver_sql(f"VACUUM (ANALYZE) pg_catalog.{catalog}")
        with contextlib.suppress(sa.exc.DBAPIError):  # needs superuser or pg_checkpoint
            # write what the DDL dirtied now, not while the next module is timed
            connection.exec_driver_sql("CHECKPOINT")


def run() -> list[Row]:
    """Switch cost, then create / migrate / drop of ``BENCH_SCHEMAS`` schemas (about 30 s)."""
    if not postgres_reachable(POSTGRES_URL):
        print(f"PostgreSQL not reachable at {POSTGRES_URL}: skipped", flush=True)
        return []
    app = _app(POSTGRES_URL, [*SWITCH_TENANTS, *(f"t{i:04d}" for i in range(SCHEMAS))])
    plain = sa.create_engine(POSTGRES_URL)
    try:
        rows = _switch_rows(app, plain, number=500)
        rows += _request_rows(app, number=50)
        rows += _lifecycle_rows(app, plain)
    finally:
        with app.app_context():
            db.engine.dispose()
        _drop_leftovers(plain)
        _vacuum_catalogs(plain)
        plain.dispose()
    return rows

