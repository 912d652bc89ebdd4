"""``flask tenant-jobs`` with the column strategy (SQLite and the real PostgreSQL): ``drop``
deletes a tenant's rows from every tenant table in one transaction and reports them,
``create`` and ``migrate`` say what they did and what is left, unknown tenants fail in one
line; and the worker command's gevent/eventlet message when the package is missing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs import TenantJobs, TenantScoped, signals

from .core_app import make_app, tables

ROOT = Path(__file__).resolve().parent.parent
db = SQLAlchemy()


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
def app(database_url: str) -> t.Iterator[Flask]:
    """acme and globex each with 2 invoices, 3 lines, 1 document and 1 contract; 1 plan."""
    app, tenant_jobs = make_app(db, database_url)
    with tables(app, db), app.app_context():
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
        yield app


def rows_by_tenant(table: str) -> dict[str, int]:
    """How many rows each tenant has in ``table`` (read without the ORM)."""
    sql = sa.text(f"SELECT tenant_id, count(*) FROM {table} GROUP BY tenant_id")
    with db.engine.connect() as connection:
        return dict(connection.execute(sql).all())  # type: ignore[arg-type]


def contracts() -> list[int]:
    with db.engine.connect() as connection:
        return sorted(connection.scalars(sa.text("SELECT id FROM cli_contract")))


def invoke(app: Flask, *args: str, **kwargs: t.Any) -> t.Any:
    return app.test_cli_runner().invoke(args=["tenant-jobs", *args], **kwargs)


def test_drop_deletes_the_tenants_rows_everywhere_and_reports_them(app: Flask) -> None:
    dropped: list[str] = []
    with signals.tenant_dropped.connected_to(lambda sender, tenant: dropped.append(tenant), app):
        result = invoke(app, "drop", "--yes", "globex")
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


def test_drop_asks_first_and_a_no_changes_nothing(app: Flask) -> None:
    result = invoke(app, "drop", "globex", input="n\n")
    assert result.exit_code == 1
    assert (
        "Delete every row of tenant 'globex' from the tenant tables, in one transaction? [y/N]"
        in result.output
    )
    assert rows_by_tenant("cli_invoice") == {"acme": 2, "globex": 2}
    result = invoke(app, "drop", "globex", input="y\n")
    assert result.exit_code == 0, result.output
    assert "Deleted tenant 'globex' in one transaction: 8 rows in 4 tables." in result.output
    assert rows_by_tenant("cli_invoice") == {"acme": 2}


def test_drop_of_a_tenant_without_rows_reports_zero(app: Flask) -> None:
    result = invoke(app, "drop", "--yes", "initech")
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
    app: Flask, args: list[str], message: str
) -> None:
    result = invoke(app, *args)
    assert result.exit_code == 1
    assert result.output.startswith(message), result.output
    assert result.output.count("\n") == 1, result.output
    assert rows_by_tenant("cli_invoice") == {"acme": 2, "globex": 2}


def test_create_says_there_is_nothing_to_make_and_what_is_left(app: Flask) -> None:
    result = invoke(app, "create", "umbrella")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "Nothing to create for tenant 'umbrella': with the column strategy its rows go in the "
        "shared tables.",
        "Left to do: add 'umbrella' to the TENANT_JOBS_TENANTS list in the app's config. Until "
        "then its requests answer 404 and its tasks are refused.",
    ]
    result = invoke(app, "create", "acme")
    assert result.output.splitlines()[1] == (
        "'acme' is in the TENANT_JOBS_TENANTS list in the app's config: the tenant is ready."
    )


def test_create_names_a_callable_source(tmp_path: Path) -> None:
    app, _ = make_app(SQLAlchemy(), f"sqlite:///{tmp_path / 'c.db'}",
                      TENANT_JOBS_TENANTS=lambda: ["acme"])
    result = invoke(app, "create", "umbrella")
    assert "add 'umbrella' to the source that TENANT_JOBS_TENANTS reads" in result.output


def test_migrate_says_there_is_nothing_per_tenant(app: Flask) -> None:
    result = invoke(app, "migrate")
    assert (result.exit_code, result.output) == (
        0,
        "Nothing to migrate per tenant with the column strategy: all tenants share the "
        "tables; migrate them once (e.g. 'flask db upgrade').\n",
    )


def test_the_api_drop_returns_the_counts(app: Flask) -> None:
    tenant_jobs: TenantJobs = app.extensions["tenant_jobs"]
    assert tenant_jobs.drop("acme") == {
        "cli_contract": 1, "cli_invoice_line": 3, "cli_document": 2, "cli_invoice": 2
    }
    assert tenant_jobs.drop("acme") == dict.fromkeys(TENANT_TABLES, 0)
    assert tenant_jobs.create("acme") == []


def test_a_failing_drop_deletes_nothing(postgres_url: str) -> None:
    """A shared row still referencing one of globex's invoices makes PostgreSQL refuse the
    DELETE of the invoices, after the lines were deleted: the whole drop is rolled back."""
    app, tenant_jobs = make_app(db, postgres_url)
    with tables(app, db), app.app_context():
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
            result = invoke(app, "drop", "--yes", "globex")
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
