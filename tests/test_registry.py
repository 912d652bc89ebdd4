"""Where tenant names come from: a list or a callable, DNS-label validation, the cache."""

from __future__ import annotations

import types
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs import (
    ConfigurationError,
    InvalidTenantNameError,
    TenantJobs,
    TenantNotFoundError,
    TenantScoped,
    current_tenant,
)
from flask_tenant_jobs import registry as registry_module
from flask_tenant_jobs.registry import is_valid_name

from .core_app import count_statements, make_app, tables
from .test_context import MALFORMED_NAMES

db = SQLAlchemy()


class TenantRow(db.Model):  # type: ignore[name-defined,misc]
    """The shared table a callable ``TENANT_JOBS_TENANTS`` reads."""

    __tablename__ = "reg_tenant"
    name: Mapped[str] = mapped_column(sa.String(63), primary_key=True)


class Invoice(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """A tenant-scoped model, so the column strategy's hooks are in play."""

    __tablename__ = "reg_invoice"
    id: Mapped[int] = mapped_column(primary_key=True)


def tenants_from_table() -> list[str]:
    """A ``TENANT_JOBS_TENANTS`` callable reading the tenants table through ``db.session``."""
    return list(db.session.scalars(sa.select(TenantRow.name)))


class FakeClock:
    """Stands in for ``time`` in the registry module so cache expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(registry_module, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


@pytest.fixture
def table_app(database_url: str) -> t.Iterator[tuple[Flask, TenantJobs]]:
    """An app whose tenants come from the ``reg_tenant`` table (acme, globex), cached 30 s."""
    app, tenant_jobs = make_app(
        db, database_url, TENANT_JOBS_TENANTS=tenants_from_table, TENANT_JOBS_CACHE_SECONDS=30
    )
    with tables(app, db):
        with app.app_context():
            db.session.add_all([TenantRow(name="globex"), TenantRow(name="acme")])
            db.session.commit()
        with app.app_context():
            yield app, tenant_jobs


def add_tenant_row(name: str) -> None:
    db.session.add(TenantRow(name=name))
    db.session.commit()


@pytest.mark.parametrize(
    "name", ["a", "7", "acme", "acme-eu", "a1", "1a", "x--y", "xn--bcher-kva", "a" * 63]
)
def test_dns_labels_are_valid_names(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize("name", MALFORMED_NAMES, ids=repr)
def test_anything_else_is_invalid(name: object) -> None:
    assert not is_valid_name(name)


def test_a_list_source() -> None:
    app, tenant_jobs = make_app(SQLAlchemy(), "sqlite://", TENANT_JOBS_TENANTS=["b", "a"])
    with app.app_context():
        assert tenant_jobs.tenant_names() == ["a", "b"]
        assert tenant_jobs.exists("a")
        assert not tenant_jobs.exists("c")


def test_a_callable_source_reads_the_tenants_table(table_app: tuple[Flask, TenantJobs]) -> None:
    _, tenant_jobs = table_app
    assert tenant_jobs.tenant_names() == ["acme", "globex"]
    with tenant_jobs.switch("acme"):
        assert current_tenant() == "acme"
    with pytest.raises(TenantNotFoundError):
        tenant_jobs.switch("initech").__enter__()


def test_a_known_tenant_costs_no_sql_once_cached(table_app: tuple[Flask, TenantJobs]) -> None:
    _, tenant_jobs = table_app
    with count_statements(db.engine) as sql:
        assert tenant_jobs.exists("acme")
        assert sql.count == 1  # the first lookup reads the table
        sql.clear()
        for _ in range(20):
            assert tenant_jobs.exists("acme")
            assert not tenant_jobs.exists("initech")
            with tenant_jobs.switch("globex"):
                pass
        assert tenant_jobs.tenant_names() == ["acme", "globex"]
        assert sql.count == 0


def test_a_new_tenant_is_seen_after_the_cache_lifetime(
    table_app: tuple[Flask, TenantJobs], clock: FakeClock
) -> None:
    _, tenant_jobs = table_app
    assert not tenant_jobs.exists("initech")
    add_tenant_row("initech")
    clock.now += 29
    assert not tenant_jobs.exists("initech")  # still cached
    clock.now += 2
    assert tenant_jobs.exists("initech")
    with tenant_jobs.switch("initech"):
        assert current_tenant() == "initech"


def test_refresh_forgets_the_cache(table_app: tuple[Flask, TenantJobs]) -> None:
    _, tenant_jobs = table_app
    assert not tenant_jobs.exists("initech")
    add_tenant_row("initech")
    tenant_jobs.refresh()
    assert tenant_jobs.exists("initech")


def test_refresh_older_than_bounds_how_often_the_source_is_read(
    table_app: tuple[Flask, TenantJobs], clock: FakeClock
) -> None:
    _, tenant_jobs = table_app
    assert not tenant_jobs.exists("initech")  # names read now
    add_tenant_row("initech")
    assert not tenant_jobs.refresh(older_than=1.0)  # read under a second ago: kept
    assert not tenant_jobs.exists("initech")
    clock.now += 1.5
    assert tenant_jobs.refresh(older_than=1.0)
    assert tenant_jobs.exists("initech")


def test_cache_seconds_zero_reads_the_source_every_time() -> None:
    calls: list[int] = []

    def source() -> list[str]:
        calls.append(1)
        return ["acme"]

    app, tenant_jobs = make_app(
        SQLAlchemy(), "sqlite://", TENANT_JOBS_TENANTS=source, TENANT_JOBS_CACHE_SECONDS=0
    )
    with app.app_context():
        for _ in range(3):
            assert tenant_jobs.exists("acme")
    assert len(calls) == 3


def test_the_source_is_read_inside_a_tenant_too(table_app: tuple[Flask, TenantJobs]) -> None:
    _, tenant_jobs = table_app
    with tenant_jobs.switch("acme"):
        add_tenant_row("initech")
        tenant_jobs.refresh()
        assert tenant_jobs.exists("initech")


@pytest.mark.parametrize("name", MALFORMED_NAMES, ids=repr)
def test_malformed_names_never_reach_the_source_or_sql(
    table_app: tuple[Flask, TenantJobs], name: object
) -> None:
    _, tenant_jobs = table_app
    tenant_jobs.refresh()
    with count_statements(db.engine) as sql:
        assert not tenant_jobs.exists(name)
        with pytest.raises(InvalidTenantNameError), tenant_jobs.switch(name):  # type: ignore[arg-type]
            pass
    assert sql.statements == []


def test_a_source_with_invalid_names_is_a_configuration_error() -> None:
    app, tenant_jobs = make_app(
        SQLAlchemy(), "sqlite://", TENANT_JOBS_TENANTS=lambda: ["acme", "Bad Name"]
    )
    with app.app_context(), pytest.raises(ConfigurationError, match="TENANT_JOBS_TENANTS"):
        tenant_jobs.tenant_names()


def test_a_single_string_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"is 'acme': use a list of tenant names"):
        make_app(SQLAlchemy(), "sqlite://", TENANT_JOBS_TENANTS="acme")


def test_one_extension_serves_several_apps() -> None:
    tenant_jobs = TenantJobs()
    apps = []
    for names in (["acme"], ["globex", "initech"]):
        app = Flask(__name__)
        app.config.update(
            SQLALCHEMY_DATABASE_URI="sqlite://",
            SERVER_NAME="example.test",
            TENANT_JOBS_TENANTS=names,
        )
        SQLAlchemy(app)
        tenant_jobs.init_app(app)
        assert app.extensions["tenant_jobs"] is tenant_jobs
        apps.append(app)
    with apps[0].app_context():
        assert tenant_jobs.tenant_names() == ["acme"]
    with apps[1].app_context():
        assert tenant_jobs.tenant_names() == ["globex", "initech"]
        assert not tenant_jobs.exists("acme")
