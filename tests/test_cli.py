"""``flask tenant-jobs``: the commands' tests.

* Column strategy (SQLite and the real PostgreSQL): ``drop`` deletes a tenant's rows
  from every tenant table in one transaction and reports them, ``create`` and
  ``migrate`` say what they did and what is left, unknown tenants fail in one line;
  the worker command's gevent/eventlet message when the package is missing.
* Apps without ``CELERY`` or without ``TenantJobs``: one clear line, no traceback.
* Schema strategy (the real PostgreSQL): ``list``, ``create``, ``drop`` and ``migrate``
  on this run's schemas.

The row-level security commands are tested with their policies in tests/test_rls.py,
and ``list`` reading a tenants table with the worker processes in tests/test_workers.py.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs import TenantJobs, TenantScoped, signals

from . import schema_fixtures
from .core_app import count_statements, make_app, tables
from .schema_app import (
    MIGRATE_LINES,
    RUN_TENANTS,
    SCHEMA_FORMAT,
    SHARED,
    Item,
    make_run_app,
    run_schemas,
    schema_of,
    tables_in,
)
from .schema_app import db as schema_db
from .schema_app import tenant_jobs as jobs
from .worker_processes import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
db = SQLAlchemy()
#: The schema strategy's app and plain engine: this run's schemas (tests/schema_fixtures.py).
app = schema_fixtures.app
admin = schema_fixtures.admin


class Plan(db.Model):  # type: ignore[name-defined,misc]
    """Shared: no tenant's rows."""

    __tablename__ = "cli_plan"
    id: Mapped[int] = mapped_column(primary_key=True)


class Invoice(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "cli_invoice"
    id: Mapped[int] = mapped_column(primary_key=True)


class InvoiceLine(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """Depends on ``Invoice``: deleted first."""

    __tablename__ = "cli_invoice_line"
    id: Mapped[int] = mapped_column(primary_key=True)
    invoice_id: Mapped[int] = mapped_column(sa.ForeignKey("cli_invoice.id"))


class Document(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """Joined-table inheritance: ``Contract`` rows live in their own table too."""

    __tablename__ = "cli_document"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {
        "polymorphic_on": "kind", "polymorphic_identity": "document"
    }


class Contract(Document):
    __tablename__ = "cli_contract"
    id: Mapped[int] = mapped_column(sa.ForeignKey("cli_document.id"), primary_key=True)
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {"polymorphic_identity": "contract"}


TENANT_TABLES = ["cli_contract", "cli_document", "cli_invoice", "cli_invoice_line"]


@pytest.fixture
def column_app(database_url: str) -> t.Iterator[Flask]:
    """acme and globex each with 2 invoices, 3 lines, 1 document and 1 contract; 1 plan."""
    column_app, tenant_jobs = make_app(db, database_url)
    with tables(column_app, db), column_app.app_context():
        db.session.add(Plan(id=1))
        for offset, name in [(0, "acme"), (10, "globex")]:
            with tenant_jobs.switch(name):
                db.session.add_all([Invoice(id=offset + 1), Invoice(id=offset + 2)])
                db.session.flush()
                db.session.add_all(
                    InvoiceLine(id=offset + i, invoice_id=offset + 1 + i % 2) for i in (1, 2, 3)
                )
                db.session.add_all([Document(id=offset + 1), Contract(id=offset + 2)])
                db.session.commit()
        yield column_app


def rows_by_tenant(table: str) -> dict[str, int]:
    """How many rows each tenant has in ``table`` (read without the ORM)."""
    sql = sa.text(f"SELECT tenant_id, count(*) FROM {table} GROUP BY tenant_id")
    with db.engine.connect() as connection:
        return dict(connection.execute(sql).all())  # type: ignore[arg-type]


def contracts() -> list[int]:
    with db.engine.connect() as connection:
        return sorted(connection.scalars(sa.text("SELECT id FROM cli_contract")))


def invoke(column_app: Flask, *args: str, **kwargs: t.Any) -> t.Any:
    return column_app.test_cli_runner().invoke(args=["tenant-jobs", *args], **kwargs)


def test_drop_deletes_the_tenants_rows_everywhere_and_reports_them(column_app: Flask) -> None:
    dropped: list[str] = []
    def record(sender: Flask, tenant: str) -> None:
        dropped.append(tenant)

    with signals.tenant_dropped.connected_to(record, column_app):
        result = invoke(column_app, "drop", "--yes", "globex")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "Deleted tenant 'globex' in one transaction: 8 rows in 4 tables.",
        "  cli_contract: 1 row",
        "  cli_document: 2 rows",
        "  cli_invoice: 2 rows",
        "  cli_invoice_line: 3 rows",
        "Left to do: remove 'globex' from the TENANT_JOBS_TENANTS list in the app's config.",
    ]
    assert dropped == ["globex"]
    for table in ("cli_invoice", "cli_invoice_line", "cli_document"):
        assert "globex" not in rows_by_tenant(table)
    assert contracts() == [2]  # acme's contract; globex's went with its document row
    assert rows_by_tenant("cli_invoice") == {"acme": 2}
    assert rows_by_tenant("cli_invoice_line") == {"acme": 3}
    assert rows_by_tenant("cli_document") == {"acme": 2}
    with db.engine.connect() as connection:
        assert connection.scalar(sa.text("SELECT count(*) FROM cli_plan")) == 1


def test_drop_asks_first_and_a_no_changes_nothing(column_app: Flask) -> None:
    result = invoke(column_app, "drop", "globex", input="n\n")
    assert result.exit_code == 1
    assert (
        "Delete every row of tenant 'globex' from the tenant tables, in one transaction? [y/N]"
        in result.output
    )
    assert rows_by_tenant("cli_invoice") == {"acme": 2, "globex": 2}
    result = invoke(column_app, "drop", "globex", input="y\n")
    assert result.exit_code == 0, result.output
    assert "Deleted tenant 'globex' in one transaction: 8 rows in 4 tables." in result.output
    assert rows_by_tenant("cli_invoice") == {"acme": 2}


def test_drop_of_a_tenant_without_rows_reports_zero(column_app: Flask) -> None:
    result = invoke(column_app, "drop", "--yes", "initech")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        "Deleted tenant 'initech' in one transaction: 0 rows in 4 tables."
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["drop", "--yes", "nope"], "Error: Unknown tenant 'nope': it is not in the "
         "TENANT_JOBS_TENANTS list in the app's config, so there is nothing to drop."),
        (["drop", "nope"], "Error: Unknown tenant 'nope'"),
        (["drop", "--yes", "Bad_Name"], "Error: Invalid tenant name 'Bad_Name'"),
        (["migrate", "--tenant", "nope"], "Error: Unknown tenant 'nope': add the name to "
         "'TENANT_JOBS_TENANTS'"),
        (["create", "Bad_Name"], "Error: Invalid tenant name 'Bad_Name'"),
    ],
)
def test_unknown_and_malformed_tenants_fail_in_one_line(
    column_app: Flask, args: list[str], message: str
) -> None:
    result = invoke(column_app, *args)
    assert result.exit_code == 1
    assert result.output.startswith(message), result.output
    assert result.output.count("\n") == 1, result.output
    assert rows_by_tenant("cli_invoice") == {"acme": 2, "globex": 2}


def test_create_says_there_is_nothing_to_make_and_what_is_left(column_app: Flask) -> None:
    result = invoke(column_app, "create", "umbrella")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "Nothing to create for tenant 'umbrella': with the column strategy its rows go in the "
        "shared tables.",
        "Left to do: add 'umbrella' to the TENANT_JOBS_TENANTS list in the app's config. Until "
        "then its requests answer 404 and its tasks are refused.",
    ]
    result = invoke(column_app, "create", "acme")
    assert result.output.splitlines()[1] == (
        "'acme' is in the TENANT_JOBS_TENANTS list in the app's config: the tenant is ready."
    )


def test_create_names_a_callable_source(tmp_path: Path) -> None:
    column_app, _ = make_app(SQLAlchemy(), f"sqlite:///{tmp_path / 'c.db'}",
                      TENANT_JOBS_TENANTS=lambda: ["acme"])
    result = invoke(column_app, "create", "umbrella")
    assert "add 'umbrella' to the source that TENANT_JOBS_TENANTS reads" in result.output


def test_migrate_says_there_is_nothing_per_tenant(column_app: Flask) -> None:
    result = invoke(column_app, "migrate")
    assert (result.exit_code, result.output) == (
        0,
        "Nothing to migrate per tenant with the column strategy: all tenants share the "
        "tables; migrate them once (e.g. 'flask db upgrade').\n",
    )


def test_the_api_drop_returns_the_counts(column_app: Flask) -> None:
    tenant_jobs: TenantJobs = column_app.extensions["tenant_jobs"]
    assert tenant_jobs.drop("acme") == {
        "cli_contract": 1, "cli_invoice_line": 3, "cli_document": 2, "cli_invoice": 2
    }
    assert tenant_jobs.drop("acme") == dict.fromkeys(TENANT_TABLES, 0)
    assert tenant_jobs.create("acme") == []


def test_a_failing_drop_deletes_nothing(postgres_url: str) -> None:
    """A shared row still referencing one of globex's invoices makes PostgreSQL refuse the
    DELETE of the invoices, after the lines were deleted: the whole drop is rolled back."""
    column_app, tenant_jobs = make_app(db, postgres_url)
    with tables(column_app, db), column_app.app_context():
        with tenant_jobs.switch("globex"):
            db.session.add(Invoice(id=11))
            db.session.flush()
            db.session.add_all([InvoiceLine(id=11, invoice_id=11), Document(id=11)])
            db.session.commit()
        with db.engine.begin() as connection:
            connection.execute(sa.text(
                "CREATE TABLE cli_reminder (id int PRIMARY KEY, "
                "invoice_id int REFERENCES cli_invoice (id))"
            ))
            connection.execute(sa.text("INSERT INTO cli_reminder VALUES (1, 11)"))
        try:
            result = invoke(column_app, "drop", "--yes", "globex")
            assert result.exit_code == 1
            assert result.output.startswith("Error: The database refused: ")
            assert "cli_reminder" in result.output
            assert result.output.count("\n") == 1, result.output
            assert rows_by_tenant("cli_invoice_line") == {"globex": 1}
            assert rows_by_tenant("cli_document") == {"globex": 1}
        finally:
            with db.engine.begin() as connection:
                connection.execute(sa.text("DROP TABLE cli_reminder"))


def test_importing_the_cli_imports_no_sqlalchemy_celery_app_or_kombu() -> None:
    """Flask loads the command before the app; ``-P gevent`` must patch before these load."""
    code = (
        "import sys, flask_tenant_jobs.cli; "
        "print(sorted(m for m in ('sqlalchemy', 'kombu', 'celery.app', 'flask_sqlalchemy') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("pool", "hide", "message"),
    [
        ("gevent", True, "Error: '-P gevent' needs the gevent package, which is not installed: "
         "pip install 'flask-tenant-jobs[gevent]'"),
        ("eventlet", False, "Error: '-P eventlet' needs the eventlet package"),
    ],
)
def test_a_missing_green_pool_package_is_one_line_naming_what_to_install(
    pool: str, hide: bool, message: str
) -> None:
    if not hide and importlib.util.find_spec(pool) is not None:
        pytest.skip(f"{pool} is installed: this case needs it missing")
    prelude = f"sys.modules[{pool!r}] = None; " if hide else ""
    code = (
        f"import sys; {prelude}from flask.cli import main; "
        f"sys.argv = ['flask', '--app', 'example_app', 'tenant-jobs', 'worker', '-P', {pool!r}]; "
        "main()"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, cwd=ROOT, env=env)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 1, output
    assert output.splitlines() == [output] and output.startswith(message), output


# -- apps the commands cannot serve (tests/jobs_app.py) --------------------------------------

VARIANT_APP = "tests.jobs_app:create_variant_app()"
PLAIN_APP = "tests.jobs_app:create_app_without_tenant_jobs()"
NO_CELERY = {"TEST_JOBS_NO_CELERY": "1"}


@pytest.mark.parametrize(
    ("app_spec", "args", "env", "expected"),
    [
        (VARIANT_APP, ["worker", "-P", "threads"], NO_CELERY, "app.config['CELERY']"),
        (VARIANT_APP, ["beat"], NO_CELERY, "app.config['CELERY']"),
        (PLAIN_APP, ["worker"], {}, "TenantJobs is not set up on app 'plain'"),
        (PLAIN_APP, ["list"], {}, "TenantJobs is not set up on app 'plain'"),
    ],
    ids=["worker-no-celery", "beat-no-celery", "worker-no-extension", "list-no-extension"],
)
def test_apps_without_celery_or_the_extension_fail_in_one_line(
    tmp_path: Path, app_spec: str, args: list[str], env: dict[str, str], expected: str
) -> None:
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", app_spec, "tenant-jobs", *args],
        cwd=ROOT,
        env=subprocess_env("TEST_JOBS_", TEST_JOBS_DATABASE_URL=database, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode != 0
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert expected in output


# -- the schema strategy's commands (tests/schema_fixtures.py: this run's schemas) ------------


@pytest.mark.postgres
def test_cli_list(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["tenant-jobs", "list"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"acme  schema={schema_of('acme')}  exists=yes",
        f"acme-eu  schema={schema_of('acme-eu')}  exists=yes",
        f"ghost  schema={schema_of('ghost')}  exists=no",
        f"globex  schema={schema_of('globex')}  exists=yes",
    ]


@pytest.mark.postgres
def test_cli_list_in_a_subprocess(app: Flask, postgres_url: str) -> None:
    flask = Path(sys.executable).with_name("flask")
    command = [str(flask)] if flask.exists() else [sys.executable, "-m", "flask"]
    env = {
        **os.environ,
        "TEST_SCHEMA_DATABASE_URL": postgres_url,
        "TEST_SCHEMA_SCHEMA_FORMAT": SCHEMA_FORMAT,
        "TEST_SCHEMA_SHARED_SCHEMA": SHARED,
        "TEST_SCHEMA_TENANTS": ",".join(RUN_TENANTS),
    }
    done = subprocess.run(
        [*command, "--app", "tests.schema_app", "tenant-jobs", "list"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"acme-eu  schema={schema_of('acme-eu')}  exists=yes" in done.stdout.splitlines()
    assert f"ghost  schema={schema_of('ghost')}  exists=no" in done.stdout.splitlines()


@pytest.mark.postgres
def test_cli_create_and_drop(app: Flask, admin: Engine) -> None:
    runner = app.test_cli_runner()
    ready = "'ghost' is in the TENANT_JOBS_TENANTS list in the app's config: the tenant is ready."
    result = runner.invoke(args=["tenant-jobs", "create", "ghost"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"Created schema '{schema_of('ghost')}' with its tables: items, notes, orders.", ready
    ]
    assert tables_in(admin, schema_of("ghost")) == {"items", "notes", "orders"}
    with jobs.switch("ghost"):
        schema_db.session.add_all([Item(id=1, name="boo"), Item(id=2, name="hoo")])
        schema_db.session.commit()

    result = runner.invoke(args=["tenant-jobs", "create", "ghost"])
    assert result.output.splitlines()[0] == (
        f"Schema '{schema_of('ghost')}' existed with every table: nothing was created."
    )
    with admin.begin() as connection:
        connection.execute(sa.text(f'DROP TABLE "{schema_of("ghost")}".notes'))
    result = runner.invoke(args=["tenant-jobs", "create", "ghost"])
    assert result.output.splitlines()[0] == (
        f"Schema '{schema_of('ghost')}' existed; created its missing tables: notes."
    )

    result = runner.invoke(args=["tenant-jobs", "drop", "ghost"], input="n\n")
    assert result.exit_code == 1
    assert f"Drop schema '{schema_of('ghost')}' of tenant 'ghost' and everything in it?" in (
        result.output
    )
    assert schema_of("ghost") in run_schemas(admin)

    result = runner.invoke(args=["tenant-jobs", "drop", "ghost"], input="y\n")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [
        f"Dropped schema '{schema_of('ghost')}' of tenant 'ghost': 2 rows in 3 tables.",
        "  items: 2 rows",
        "  notes: 0 rows",
        "  orders: 0 rows",
        "Left to do: remove 'ghost' from the TENANT_JOBS_TENANTS list in the app's config.",
    ]
    assert schema_of("ghost") not in run_schemas(admin)

    result = runner.invoke(args=["tenant-jobs", "drop", "--yes", "ghost"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        f"Tenant 'ghost' had no schema '{schema_of('ghost')}': nothing was dropped."
    )


@pytest.mark.postgres
def test_cli_create_of_a_name_not_yet_listed_says_what_is_left(app: Flask, admin: Engine) -> None:
    result = app.test_cli_runner().invoke(args=["tenant-jobs", "create", "initech"])
    try:
        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == [
            f"Created schema '{schema_of('initech')}' with its tables: items, notes, orders.",
            "Left to do: add 'initech' to the TENANT_JOBS_TENANTS list in the app's config. "
            "Until then its requests answer 404 and its tasks are refused.",
        ]
        response = app.test_client().get("/items", base_url="http://initech.example.test")
        assert response.status_code == 404
    finally:
        jobs.drop("initech")


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["drop", "--yes", "initech"], "Error: Unknown tenant 'initech': it is not in the "
         "TENANT_JOBS_TENANTS list in the app's config, so there is nothing to drop."),
        (["migrate", "--tenant", "initech"], "Error: Unknown tenant 'initech': add the name to"),
    ],
)
def test_cli_drop_and_migrate_of_an_unknown_tenant_fail_in_one_line(
    app: Flask, admin: Engine, args: list[str], message: str
) -> None:
    with count_statements(schema_db.engine) as log:
        result = app.test_cli_runner().invoke(args=["tenant-jobs", *args])
    assert result.exit_code == 1
    assert result.output.startswith(message), result.output
    assert result.output.count("\n") == 1
    assert log.statements == []
    assert schema_of("initech") not in run_schemas(admin)


@pytest.mark.postgres
def test_tenant_tables_in_the_shared_schema_are_reported(
    app: Flask, admin: Engine, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``db.create_all()`` outside a tenant puts the tenant tables in the shared schema: init_app
    warns and ``migrate`` reports them, each with the DROP TABLE that removes them."""
    def init_app_warnings() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            other = make_run_app(postgres_url)
        with other.app_context():
            schema_db.engine.dispose()
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    assert init_app_warnings() == []

    schema_db.create_all()
    assert tables_in(admin, SHARED) == {"tenants", "items", "notes", "orders"}
    drop = f'DROP TABLE "{SHARED}"."items", "{SHARED}"."notes", "{SHARED}"."orders";'
    (warning,) = init_app_warnings()
    assert warning.startswith(
        f"Tenant tables found in the shared schema '{SHARED}': items, notes, orders. A tenant "
        "whose own schema lacks one of them reads and writes the shared one instead."
    )
    assert warning.endswith(f"remove them with: {drop}")
    assert jobs.check_storage() == [warning]

    result = app.test_cli_runner().invoke(args=["tenant-jobs", "migrate"])
    assert result.exit_code == 1  # ghost has no schema
    assert f"Warning: {warning}" in result.stderr
    with admin.begin() as connection:
        connection.execute(sa.text(drop))
    assert jobs.check_storage() == []
    assert tables_in(admin, SHARED) == {"tenants"}


@pytest.mark.postgres
def test_cli_migrate_every_tenant(app: Flask, admin: Engine) -> None:
    with admin.begin() as connection:
        connection.execute(sa.text(f'DROP TABLE "{schema_of("globex")}".notes'))
    result = app.test_cli_runner().invoke(args=["tenant-jobs", "migrate"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert sorted(lines[:4]) == MIGRATE_LINES
    assert lines[4:] == ["migrated 3 of 4 tenants", "Error: failed tenants: ghost"]
    assert "notes" in tables_in(admin, schema_of("globex"))


@pytest.mark.postgres
def test_cli_migrate_one_tenant_and_in_parallel(app: Flask) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["tenant-jobs", "migrate", "--tenant", "acme-eu"])
    assert (result.exit_code, result.output) == (0, "acme-eu: ok\nmigrated 1 of 1 tenants\n")

    jobs.create("ghost")
    result = runner.invoke(args=["tenant-jobs", "migrate", "--jobs", "4"])
    assert result.exit_code == 0, result.output
    assert sorted(result.output.splitlines()) == [
        "acme-eu: ok", "acme: ok", "ghost: ok", "globex: ok", "migrated 4 of 4 tenants"
    ]
    assert runner.invoke(args=["tenant-jobs", "migrate", "--jobs", "0"]).exit_code == 2


@pytest.mark.postgres
def test_cli_errors_are_one_line(app: Flask) -> None:
    runner = app.test_cli_runner()
    for args, message in [
        (["migrate", "--tenant", "ghost"], f"Error: The schema '{schema_of('ghost')}'"),
        (["migrate", "--tenant", "initech"], "Error: Unknown tenant 'initech'"),
        (["create", "Bad_Name"], "Error: Invalid tenant name 'Bad_Name'"),
        (["drop", "--yes", "Bad_Name"], "Error: Invalid tenant name 'Bad_Name'"),
    ]:
        result = runner.invoke(args=["tenant-jobs", *args])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(message)
        assert result.output.count("\n") == 1, result.output
