"""Hostile input, fuzzed with hypothesis, on the real PostgreSQL (both strategies) and Redis.

* Requests: ``Host`` headers (subdomain resolver), ``X-Tenant`` headers (header
  resolver) and paths (path resolver), given to the app as a WSGI server would
  (latin-1 strings of arbitrary bytes), all on a view that writes a row. Each
  answers 200 in a known tenant (and writes exactly one row there), or 400/404
  (or a redirect) having run no SQL and written nothing; never 500.
* ``switch()`` and ``create()`` with arbitrary objects: they raise
  ``InvalidTenantNameError`` (or ``TenantNotFoundError``) without any SQL, and
  ``create()`` succeeds only for valid names.
* Raw Celery messages with forged or malformed ``tenant_for_job`` headers (bytes,
  lists, dicts, numbers, booleans, ``None``, 10 KB strings, SQL fragments, unknown
  tenants, nested under ``headers``, missing), sent with ``celery.Celery.send_task``
  (past the sender-side checks) or published with kombu directly, to an in-process
  worker: each fails with a ``TenantError`` subclass, runs no SQL and writes
  nothing, and the worker runs the next good task in its tenant.

Redis database ``TEST_HOSTILE_REDIS_DB`` (default 10) is flushed and used. Tables
``ftj_hostile_note`` and schemas ``ftjhostile_*`` are dropped afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import typing as t
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
import sqlalchemy as sa
from celery import Celery, Task
from celery.contrib.testing.worker import start_worker
from flask import Flask, g, request
from flask_sqlalchemy import SQLAlchemy
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from kombu import Exchange, Queue
from werkzeug.test import EnvironBuilder, run_wsgi_app

from flask_tenant_jobs import (
    InvalidTenantNameError,
    NoTenantError,
    TenantError,
    TenantJobs,
    TenantNotFoundError,
    TenantScoped,
    current_tenant,
    tenant_task,
)
from flask_tenant_jobs.registry import TENANT_NAME, is_valid_name
from flask_tenant_jobs.sending import TenantCelery

from .core_app import StatementCounter
from .data import HOSTS, KNOWN, LABELS, PATHS, RAW, SQL_FRAGMENTS
from .worker_processes import redis_db_url

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning"),
]

TENANTS = ["acme", "globex", "initech"]
SCHEMA_FORMAT = "ftjhostile_{tenant}"
STRATEGIES = ["column", "schema"]
RESOLVERS = ["subdomain", "header", "path"]
HEADER = "tenant_for_job"
REDIS_DB = int(os.environ.get("TEST_HOSTILE_REDIS_DB", "10"))
QUEUE = f"ftj-hostile-{uuid.uuid4().hex[:8]}"
WAIT = 20.0

column_db = SQLAlchemy()
schema_db = SQLAlchemy()


class ColumnNote(TenantScoped, column_db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "ftj_hostile_note"
    id = column_db.Column(column_db.Integer, primary_key=True)
    body = column_db.Column(column_db.String(100), nullable=False)
    believed = column_db.Column(column_db.String(63))


class SchemaNote(schema_db.Model):  # type: ignore[name-defined,misc]
    """A plain model: only the tenant's schema keeps tenants apart."""

    __tablename__ = "ftj_hostile_note"
    id = schema_db.Column(schema_db.Integer, primary_key=True)
    body = schema_db.Column(schema_db.String(100), nullable=False)
    believed = schema_db.Column(schema_db.String(63))


DBS: dict[str, tuple[SQLAlchemy, t.Any]] = {
    "column": (column_db, ColumnNote),
    "schema": (schema_db, SchemaNote),
}


@tenant_task(bind=True)
def write_note(self: Task, body: str) -> dict[str, t.Any]:
    """The worker test's task (schema strategy): write a note in the task's tenant."""
    schema_db.session.add(SchemaNote(body=body, believed=current_tenant()))
    schema_db.session.commit()
    return {"tenant": current_tenant(), "header": getattr(self.request, HEADER, None)}


# -- the apps -----------------------------------------------------------------------------------


@dataclass
class Site:
    strategy: str
    resolver: str
    app: Flask
    tenant_jobs: TenantJobs
    sql: StatementCounter
    plain: sa.Engine

    def notes(self) -> Counter[tuple[str, str | None]]:
        """``(tenant whose data holds it, tenant the writer believed)`` of every note."""
        return count_notes(self.plain, self.strategy)


def count_notes(plain: sa.Engine, strategy: str) -> Counter[tuple[str, str | None]]:
    if strategy == "column":
        query = "SELECT tenant_id, believed, count(*) FROM ftj_hostile_note GROUP BY 1, 2"
    else:
        query = " UNION ALL ".join(
            f"SELECT '{name}', believed, count(*) FROM "
            f'"{SCHEMA_FORMAT.format(tenant=name)}".ftj_hostile_note GROUP BY 2'
            for name in TENANTS
        )
    with plain.connect() as connection:
        return Counter({(place, believed): n for place, believed, n in connection.execute(
            sa.text(query)
        )})


def make_app(
    strategy: str, resolver: str, database_url: str, celery: dict[str, t.Any] | None = None
) -> tuple[Flask, TenantJobs]:
    db, model = DBS[strategy]
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        SERVER_NAME="example.test" if resolver == "subdomain" else None,
        TENANT_JOBS_STRATEGY=strategy,
        TENANT_JOBS_RESOLVER=resolver,
        TENANT_JOBS_TENANTS=TENANTS,
        TENANT_JOBS_SCHEMA_FORMAT=SCHEMA_FORMAT,
    )
    if celery is not None:
        app.config["CELERY"] = celery
    db.init_app(app)
    tenant_jobs = TenantJobs(app, db=db)

    @app.get("/<tenant>/write" if resolver == "path" else "/write")
    def write() -> dict[str, t.Any]:
        db.session.add(model(body=request.args.get("body", "x")[:100], believed=current_tenant()))
        db.session.commit()
        return {"tenant": current_tenant(), "g": g.tenant}

    return app, tenant_jobs


@pytest.fixture(scope="module")
def plain(postgres_url: str) -> Iterator[sa.Engine]:
    """An engine without any tenant scoping, to see what really is in the database."""
    engine = sa.create_engine(postgres_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def storage(postgres_url: str) -> Iterator[dict[str, tuple[Flask, TenantJobs]]]:
    """One app per strategy (subdomain resolver), with its table or tenant schemas."""
    apps = {strategy: make_app(strategy, "subdomain", postgres_url) for strategy in STRATEGIES}
    column_app, _ = apps["column"]
    schema_app, schema_jobs = apps["schema"]
    with column_app.app_context():
        column_db.drop_all()
        column_db.create_all()
    with schema_app.app_context():
        for name in TENANTS:
            schema_jobs.drop(name)  # leftovers of an interrupted run
            schema_jobs.create(name)
    try:
        yield apps
    finally:
        with column_app.app_context():
            column_db.session.remove()
            column_db.drop_all()
            column_db.engine.dispose()
        with schema_app.app_context():
            schema_db.session.remove()
            for name in TENANTS:
                schema_jobs.drop(name)
            schema_db.engine.dispose()


@pytest.fixture(scope="module")
def sites(
    storage: dict[str, tuple[Flask, TenantJobs]], postgres_url: str, plain: sa.Engine
) -> Iterator[dict[tuple[str, str], Site]]:
    """A site for every strategy and resolver; the tenant caches are warm."""
    made: dict[tuple[str, str], Site] = {}
    for strategy in STRATEGIES:
        for resolver in RESOLVERS:
            if resolver == "subdomain":
                app, tenant_jobs = storage[strategy]
            else:
                app, tenant_jobs = make_app(strategy, resolver, postgres_url)
            with app.app_context():
                engine = DBS[strategy][0].engine
            site = Site(strategy, resolver, app, tenant_jobs, StatementCounter(engine), plain)
            with app.app_context():
                for name in TENANTS:  # warm: the schema strategy has seen every schema
                    with tenant_jobs.switch(name):
                        pass
            made[(strategy, resolver)] = site
    try:
        yield made
    finally:
        for site in made.values():
            site.sql.detach()
            if site.resolver != "subdomain":
                with site.app.app_context():
                    DBS[site.strategy][0].engine.dispose()


def call(app: Flask, path: str, environ: dict[str, str]) -> tuple[int, bytes]:
    """Run one request through the WSGI app as a server would: ``environ`` overrides the
    built one. (Werkzeug's test client parses the URL itself, IDNA included, and would
    fail on hosts a server passes through untouched.)"""
    builder = EnvironBuilder(path=path, base_url="http://example.test")
    try:
        wsgi_environ = builder.get_environ()
    finally:
        builder.close()
    wsgi_environ.update(environ)
    app_iter, status, _ = run_wsgi_app(app, wsgi_environ, buffered=True)
    try:
        return int(status.split()[0]), b"".join(app_iter)
    finally:
        close = getattr(app_iter, "close", None)
        if close is not None:
            close()


def check_response(site: Site, environ: dict[str, str], path: str = "/write") -> int:
    """One request: 200 in a known tenant with one row written there, or an answer that
    ran no SQL and wrote nothing; never a 500."""
    before = site.notes()
    site.sql.clear()
    status, body = call(site.app, path, environ)
    statements = list(site.sql.statements)
    after = site.notes()
    assert status in (200, 308, 400, 404), (environ, status, body[:300])
    if status == 200:
        tenant = json.loads(body)["tenant"]
        assert tenant in TENANTS and json.loads(body)["g"] == tenant
        assert after - before == Counter({(tenant, tenant): 1})
        assert before - after == Counter()
    else:
        assert after == before, environ
        assert statements == [], (environ, statements)
    assert current_tenant() is None
    return status


# -- requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=200, deadline=None)
@given(host=HOSTS)
def test_hostile_hosts(sites: dict[tuple[str, str], Site], strategy: str, host: str) -> None:
    site = sites[(strategy, "subdomain")]
    event(f"status {check_response(site, {'HTTP_HOST': host})}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_known_hosts_in_any_case_write_in_their_tenant(
    sites: dict[tuple[str, str], Site], strategy: str
) -> None:
    site = sites[(strategy, "subdomain")]
    for host in ("acme.example.test", "GLOBEX.Example.Test:8080", "initech.example.test."):
        before = site.notes()
        status, body = call(site.app, "/write", {"HTTP_HOST": host})
        tenant = host.split(".")[0].lower()
        assert (status, json.loads(body)) == (200, {"tenant": tenant, "g": tenant})
        assert site.notes() - before == Counter({(tenant, tenant): 1})
    for host in ("example.test", "www.example.test", "umbrella.example.test"):
        check_response(site, {"HTTP_HOST": host})


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=200, deadline=None)
@given(value=st.one_of(KNOWN, LABELS, RAW))
def test_hostile_tenant_headers(
    sites: dict[tuple[str, str], Site], strategy: str, value: str
) -> None:
    site = sites[(strategy, "header")]
    event(f"status {check_response(site, {'HTTP_X_TENANT': value})}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=200, deadline=None)
@given(path=PATHS)
def test_hostile_paths(sites: dict[tuple[str, str], Site], strategy: str, path: str) -> None:
    site = sites[(strategy, "path")]
    event(f"status {check_response(site, {'PATH_INFO': path}, path='/')}")


# -- switch() and create() -------------------------------------------------------------------

NAMES = st.one_of(
    LABELS,
    st.text(max_size=80),
    st.binary(max_size=80),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.lists(st.text(max_size=10), max_size=3),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    st.tuples(KNOWN),
    st.from_regex(TENANT_NAME, fullmatch=True),
)


def expected_error(name: object) -> type[TenantError] | None:
    """What switching into ``name`` must raise (``None``: it works)."""
    if not is_valid_name(name):
        return InvalidTenantNameError
    return None if name in TENANTS else TenantNotFoundError


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=150, deadline=None)
@given(name=NAMES)
def test_hostile_names_for_switch_and_create(
    sites: dict[tuple[str, str], Site], strategy: str, name: object
) -> None:
    site = sites[(strategy, "subdomain")]
    tenant_jobs = site.tenant_jobs
    with site.app.app_context():
        error = expected_error(name)
        site.sql.clear()
        event(f"switch: {error.__name__ if error else 'ok'}")
        if error is None:
            with tenant_jobs.switch(name):  # type: ignore[arg-type]
                assert current_tenant() == name
        else:
            with pytest.raises(error), tenant_jobs.switch(name):  # type: ignore[arg-type]
                pytest.fail("the block must not run")
        assert current_tenant() is None
        assert site.sql.statements == []  # names are checked without SQL

        assume(name not in TENANTS)  # never re-create (and then drop) a real tenant
        schema = SCHEMA_FORMAT.format(tenant=name)
        creatable = is_valid_name(name) and (strategy == "column" or len(schema) <= 63)
        event(f"create: {'ok' if creatable else 'refused'}")
        if not creatable:
            with pytest.raises(InvalidTenantNameError):
                tenant_jobs.create(name)  # type: ignore[arg-type]
            with pytest.raises(InvalidTenantNameError):
                tenant_jobs.drop(name)  # type: ignore[arg-type]
            assert site.sql.statements == []  # refused before any SQL
            return
        before = site.notes()
        tenant_jobs.create(t.cast(str, name))
        try:
            if strategy == "schema":
                assert tenant_jobs.describe(t.cast(str, name))["exists"] == "yes"
        finally:
            tenant_jobs.drop(t.cast(str, name))
        assert site.notes() == before
        if strategy == "schema":
            assert tenant_jobs.describe(t.cast(str, name))["exists"] == "no"


# -- raw Celery messages ------------------------------------------------------------------------


@dataclass
class WorkerSite:
    app: Flask
    tenant_jobs: TenantJobs
    celery: TenantCelery
    sql: StatementCounter
    plain: sa.Engine

    def notes(self) -> Counter[tuple[str, str | None]]:
        return count_notes(self.plain, "schema")


@pytest.fixture(scope="module")
def worker_site(
    storage: dict[str, tuple[Flask, TenantJobs]],
    postgres_url: str,
    redis_url: str,
    plain: sa.Engine,
) -> Iterator[WorkerSite]:
    """A schema-strategy app with an in-process worker (solo pool) on Redis."""
    url = redis_db_url(redis_url, REDIS_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    celery_config = {
        "broker_url": url,
        "result_backend": url,
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
        "worker_enable_remote_control": False,
        "broker_connection_retry_on_startup": True,
        # the durable settings of docs/reliability.md: a failed task is still acknowledged
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
    }
    app, tenant_jobs = make_app("schema", "subdomain", postgres_url, celery=celery_config)
    celery_app: TenantCelery = app.extensions["celery"]
    with app.app_context():
        engine = schema_db.engine
        for name in TENANTS:
            with tenant_jobs.switch(name):
                pass
    site = WorkerSite(app, tenant_jobs, celery_app, StatementCounter(engine), plain)
    root = logging.getLogger()
    root_level, root_handlers = root.level, root.handlers[:]
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
            yield site
    finally:
        root.setLevel(root_level)
        root.handlers[:] = root_handlers
        site.sql.detach()
        with app.app_context():
            schema_db.engine.dispose()
        celery_app.close()
        client.flushdb()
        client.close()


#: Header values no sender-side check would let through.
FORGED = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.one_of(KNOWN, st.integers(), st.none()), max_size=4),
    st.dictionaries(
        st.text(max_size=8).filter(lambda key: not key.startswith("__")),
        st.one_of(KNOWN, st.integers(), st.none()),
        max_size=3,
    ),
    st.sampled_from(SQL_FRAGMENTS),
    st.just("x" * 10_240),
    st.from_regex(TENANT_NAME, fullmatch=True).filter(lambda name: name not in TENANTS),
    st.text(max_size=40).filter(lambda name: name not in TENANTS),
)
HOW = st.sampled_from(["send_task", "nested", "kombu", "missing"])


def forged_error(value: object, how: str) -> type[TenantError]:
    if how == "missing" or value is None:
        return NoTenantError
    return InvalidTenantNameError if not is_valid_name(value) else TenantNotFoundError


def publish_raw(celery_app: Celery, task_id: str, headers: dict[str, t.Any]) -> None:
    """A Celery protocol 2 message, published with kombu (no Celery sending code at all)."""
    exchange = Exchange(QUEUE, type="direct")
    message_headers = {
        "lang": "py", "task": f"{__name__}.write_note", "id": task_id, "root_id": task_id,
        "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
        "timelimit": [None, None], "argsrepr": "('forged',)", "kwargsrepr": "{}",
        "origin": "hostile", "ignore_result": False, **headers,
    }  # fmt: skip
    body = [["forged"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    with celery_app.connection_for_write() as connection:
        connection.Producer().publish(
            body,
            exchange=exchange,
            routing_key=QUEUE,
            headers=message_headers,
            serializer="json",
            declare=[Queue(QUEUE, exchange, routing_key=QUEUE)],
        )


@pytest.mark.redis
@settings(max_examples=150, deadline=None)
@given(batch=st.lists(st.tuples(FORGED, HOW), min_size=1, max_size=4), good=KNOWN)
def test_forged_task_headers_fail_cleanly_and_the_worker_carries_on(
    worker_site: WorkerSite, batch: list[tuple[object, str]], good: str
) -> None:
    celery_app = worker_site.celery
    before = worker_site.notes()
    worker_site.sql.clear()
    sent = []
    for value, how in batch:
        if how == "kombu":
            task_id = str(uuid.uuid4())
            publish_raw(celery_app, task_id, {HEADER: value})
            result = celery_app.AsyncResult(task_id)
        else:
            headers = {
                "send_task": {HEADER: value},
                "nested": {"headers": {HEADER: value}},
                "missing": {},
            }[how]
            # Celery's own send_task: TenantCelery.send_task's checks are bypassed.
            result = Celery.send_task(
                celery_app, f"{__name__}.write_note", args=("forged",), headers=headers
            )
        sent.append((value, how, result))

    for value, how, result in sent:
        error = result.get(timeout=WAIT, propagate=False)
        assert result.state == "FAILURE", (value, how, result.state, error)
        assert isinstance(error, forged_error(value, how)), (value, how, error)
        event(f"{how}: {type(error).__name__}")
    assert worker_site.sql.statements == []  # refused before any SQL: nothing could be written

    with worker_site.app.app_context(), worker_site.tenant_jobs.switch(good):
        good_result = celery_app.tasks[f"{__name__}.write_note"].delay("good")
    assert good_result.get(timeout=WAIT) == {"tenant": good, "header": good}
    assert worker_site.notes() - before == Counter({(good, good): 1})
    assert before - worker_site.notes() == Counter()
