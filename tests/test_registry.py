"""Where tenant names come from: a list or a callable, DNS-label validation, the cache."""

from __future__ import annotations

import threading
import time
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
    TenantSourceError,
    current_tenant,
)
from flask_tenant_jobs import registry as registry_module
from flask_tenant_jobs.registry import is_valid_name

from .core_app import count_statements, make_app, tables
from .data import MALFORMED_NAMES, tenant_table

db = SQLAlchemy()


TenantRow = tenant_table(db, "reg_tenant")


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


class FlakySource:
    """A ``TENANT_JOBS_TENANTS`` callable that counts its calls and can be made to fail."""

    def __init__(self, names: list[t.Any]) -> None:
        self.names: t.Any = names
        self.error: Exception | None = None
        self.calls = 0

    def __call__(self) -> t.Any:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.names


def flaky_site(source: FlakySource, **config: t.Any) -> tuple[Flask, TenantJobs]:
    """An app on ``source`` (cached 30 s, stale after 300 s) with a ``/whoami`` view."""
    config = {"TENANT_JOBS_CACHE_SECONDS": 30, "TENANT_JOBS_STALE_SECONDS": 300, **config}
    app, tenant_jobs = make_app(SQLAlchemy(), "sqlite://", TENANT_JOBS_TENANTS=source, **config)

    @app.route("/whoami")
    def whoami() -> str:
        return current_tenant() or "-"

    return app, tenant_jobs


def statuses(app: Flask, host: str, times: int) -> list[int]:
    client = app.test_client()
    return [client.get(f"http://{host}/whoami").status_code for _ in range(times)]


def test_a_source_with_invalid_names_skips_them_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: one malformed name took every tenant down (500s, and the source was
    called again on every request)."""
    source = FlakySource(["acme", "Bad Name", "globex", "x'; drop table t; --"])
    app, tenant_jobs = flaky_site(source)
    with caplog.at_level("WARNING", logger="flask_tenant_jobs.registry"):
        assert statuses(app, "acme.example.test", 20) == [200] * 20
        with app.app_context():
            assert tenant_jobs.tenant_names() == ["acme", "globex"]
    assert source.calls == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "'Bad Name'" in warnings[0] and "drop table" in warnings[0]


def test_a_failing_source_serves_the_last_good_list(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a source that raised made every request call it again and answer 500."""
    source = FlakySource(["acme", "globex"])
    app, _ = flaky_site(source)
    assert statuses(app, "acme.example.test", 1) == [200]
    source.error = OSError("tenants table unreachable")
    clock.now += 31  # the cache expired: the next lookup reads the source, which fails
    with caplog.at_level("WARNING", logger="flask_tenant_jobs.registry"):
        assert statuses(app, "acme.example.test", 20) == [200] * 20
        assert statuses(app, "initech.example.test", 5) == [404] * 5
        assert source.calls == 2  # once when it worked, once failing: not once per request
        clock.now += 31
        assert statuses(app, "globex.example.test", 20) == [200] * 20
        assert source.calls == 3  # the next period: once more
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 2  # logged once per cache period
    assert "tenants table unreachable" in failures[0].getMessage()
    source.error = None
    source.names = ["acme"]
    clock.now += 31
    assert statuses(app, "globex.example.test", 1) == [404]  # the source works again


def test_the_last_good_list_is_served_for_a_bounded_time(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    source = FlakySource(["acme"])
    app, tenant_jobs = flaky_site(source)
    assert statuses(app, "acme.example.test", 1) == [200]
    source.error = OSError("down")
    for _ in range(10):  # 10 cache periods = 310 s: past TENANT_JOBS_STALE_SECONDS
        clock.now += 31
        statuses(app, "acme.example.test", 1)
    assert source.calls == 11
    with caplog.at_level("ERROR", logger="flask_tenant_jobs.registry"):
        clock.now += 31
        assert statuses(app, "acme.example.test", 10) == [503] * 10
    assert source.calls == 12
    assert any("every tenant lookup fails" in r.getMessage() for r in caplog.records)
    with app.app_context(), pytest.raises(TenantSourceError, match="TENANT_JOBS_STALE_SECONDS"):
        tenant_jobs.tenant_names()
    assert source.calls == 12


def test_no_list_ever_read_fails_closed(clock: FakeClock) -> None:
    """The source failed from the start: requests answer 503, lookups raise, and the
    source is still called at most once per cache period."""
    source = FlakySource(["acme"])
    source.error = OSError("down")
    app, tenant_jobs = flaky_site(source)
    assert statuses(app, "acme.example.test", 20) == [503] * 20
    assert statuses(app, "example.test", 1) == [200]  # no tenant to check: served
    with app.app_context():
        with pytest.raises(TenantSourceError):
            tenant_jobs.exists("acme")
        with pytest.raises(TenantSourceError), tenant_jobs.switch("acme"):
            pass
        assert not tenant_jobs.exists("Not A Name")  # malformed: never looked up
    assert source.calls == 1
    clock.now += 31
    source.error = None
    assert statuses(app, "acme.example.test", 1) == [200]
    assert source.calls == 2


def test_refresh_forces_a_read_but_misses_stay_bounded_while_failing(clock: FakeClock) -> None:
    source = FlakySource(["acme"])
    app, tenant_jobs = flaky_site(source)
    with app.app_context():
        assert tenant_jobs.exists("acme")
        source.error = OSError("down")
        clock.now += 2
        assert tenant_jobs.refresh(older_than=1.0)  # a worker's miss: allowed, fails
        assert tenant_jobs.exists("acme")  # the last good list
        assert source.calls == 2
        clock.now += 2
        assert not tenant_jobs.refresh(older_than=1.0)  # failing: once per cache period
        assert tenant_jobs.refresh()  # an explicit refresh always reads
        assert tenant_jobs.exists("acme")
        assert source.calls == 3


@pytest.mark.parametrize("returned", ["acme", None, 42], ids=repr)
def test_a_source_returning_no_list_counts_as_failing(
    returned: object, caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    source = FlakySource(["acme"])
    app, tenant_jobs = flaky_site(source)
    with app.app_context():
        assert tenant_jobs.exists("acme")
        source.names = returned
        clock.now += 31
        with caplog.at_level("WARNING", logger="flask_tenant_jobs.registry"):
            assert tenant_jobs.tenant_names() == ["acme"]
        assert "not a list of names" in caplog.text


def test_a_lookup_during_another_threads_read_waits_for_its_names() -> None:
    """Regression (found by the threads-pool stress test): the cache was marked fresh
    before the names were stored, so a thread looking up during another's first read
    found no tenants at all."""
    reading, release = threading.Event(), threading.Event()

    def slow_source() -> list[str]:
        reading.set()
        release.wait(10)
        return ["acme"]

    app, tenant_jobs = make_app(SQLAlchemy(), "sqlite://", TENANT_JOBS_TENANTS=slow_source)
    found: list[bool] = []

    def look_up() -> None:
        with app.app_context():
            found.append(tenant_jobs.exists("acme"))

    first, second = threading.Thread(target=look_up), threading.Thread(target=look_up)
    first.start()
    assert reading.wait(10)
    second.start()
    time.sleep(0.1)  # the second lookup is under way while the first reads
    release.set()
    first.join(10)
    second.join(10)
    assert found == [True, True]


def test_stale_seconds_must_not_be_negative() -> None:
    with pytest.raises(ConfigurationError, match="TENANT_JOBS_STALE_SECONDS"):
        make_app(SQLAlchemy(), "sqlite://", TENANT_JOBS_STALE_SECONDS=-1)


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
