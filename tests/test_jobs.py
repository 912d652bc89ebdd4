"""The Celery matrix, in-process: every case in three modes.

* ``eager``: ``task_always_eager=True`` (and ``.apply()``), which must behave like a worker;
* ``redis``: a real worker (solo pool, a thread of this process), Redis broker and results;
* ``rabbitmq``: the same worker with RabbitMQ as broker and Redis for results.

Redis results (and the Redis broker) use database ``TEST_JOBS_REDIS_DB`` (default 11,
flushed first); both brokers use a queue of this module's own.

One Celery app (and worker) per mode, kept for the whole module: the tasks of
``tests.jobs_app`` are shared tasks bound to the most recently made Celery app.
Each mode has its own SQLite file database; its tenants come from the shared
``jobs_tenant`` table through a callable that counts its calls.

Every case asserts the tenant each task saw (``current_tenant()``) and the header
(``self.request.tenant_for_job``), and that nothing is left behind: after every task
the worker thread has no tenant and no Flask app context, and the next plain task
runs with no tenant.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import typing as t
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery, chain, chord, group
from celery import Task as CeleryTask
from celery.canvas import Signature
from celery.contrib.testing.worker import start_worker
from celery.exceptions import AlwaysEagerIgnored
from celery.result import AsyncResult
from celery.signals import before_task_publish, task_postrun, task_prerun
from flask import Flask, has_app_context
from kombu import Queue
from sqlalchemy import event

from flask_tenant_jobs import (
    ConfigurationError,
    InvalidTenantNameError,
    NoTenantError,
    TenantError,
    TenantJobs,
    TenantNotFoundError,
    current_tenant,
    runs,
)
from flask_tenant_jobs import worker as worker_module
from flask_tenant_jobs.context import is_unscoped
from flask_tenant_jobs.log import TenantLogFilter
from flask_tenant_jobs.sending import TenantCelery
from flask_tenant_jobs.signals import task_enqueued, tenant_not_found
from flask_tenant_jobs.signing import Signer, signature_header

from . import jobs_app
from .jobs_app import (
    HANDLER_CALLS,
    RAISING_HANDLER_CALLS,
    TASK_LOGGER,
    Seen,
    Tenant,
    autoretry_observe,
    collect_tenants,
    db,
    each_tenant_maintenance,
    errback_observe,
    fail,
    fail_with_raising_handler,
    ignore,
    leak_unscoped,
    log_tenant,
    observe_around_a_nested_run,
    observe_task,
    plain_observe,
    plain_scoping,
    record_errback,
    record_link,
    reject,
    replace_with_map,
    replace_with_observe,
    retry_then_observe,
    retry_with_raising_handler,
    scoping_of_task,
    spawn_child,
    write_seen,
)
from .worker_processes import wait_until

pytestmark = pytest.mark.filterwarnings(
    # celery's Redis result backend calls redis-py's deprecated setex
    "ignore:Call to deprecated setex:DeprecationWarning"
)

#: Each mode is a broker (eager: none), and with "-schema" the schema strategy on the real
#: PostgreSQL instead of the column strategy on SQLite; with "-signed" the tenant headers
#: are signed (``TENANT_JOBS_SIGNING_KEY``) and checked by the worker.
MODES = [
    "eager", "redis", "rabbitmq", "eager-schema", "redis-schema", "eager-signed", "redis-signed"
]
SIGNING_KEY = "jobs-signing-key-of-the-test-modes"
#: Schema names of the schema-strategy modes (dropped afterwards).
SCHEMA_FORMAT = "ftjjobs_{tenant}"
TENANTS = ("acme", "globex", "initech")
#: Seconds any single wait may take.
TIMEOUT = 20.0
#: The Redis database for this module's results (and the Redis broker); flushed at start.
REDIS_DB = int(os.environ.get("TEST_JOBS_REDIS_DB", "11"))
#: A queue of our own, so that no other worker on the same broker takes our tasks.
QUEUE = "flask-tenant-jobs-inprocess"
OBSERVE = "tests.jobs_app.observe_task"
HEADER = "tenant_for_job"
#: Tasks whose handlers raise: Celery runs their handlers again after task_postrun, so the
#: tenant is kept past it on purpose (the next task's record shows it is gone by then).
SECOND_HANDLER_ROUND = {
    "tests.jobs_app.fail_with_raising_handler",
    "tests.jobs_app.retry_with_raising_handler",
}

Observation = dict[str, t.Any]


# -- The mode fixture ---------------------------------------------------------------------


@dataclass
class Jobs:
    """One mode: its Flask app, extension, Celery app, and what was seen while it ran."""

    mode: str
    app: Flask
    ext: TenantJobs
    celery: TenantCelery
    #: One entry per call of the ``TENANT_JOBS_TENANTS`` callable.
    source_calls: list[str] = field(default_factory=list)
    #: While not empty, the ``TENANT_JOBS_TENANTS`` callable raises its first item.
    source_errors: list[Exception] = field(default_factory=list)
    #: SQL statements that read the tenants table.
    tenant_queries: list[str] = field(default_factory=list)
    #: task id -> (tenant, has app context) at the start of each run (after the restore).
    started: dict[str, list[tuple[str | None, bool]]] = field(default_factory=dict)
    #: (task name, tenant, has app context) in a worker thread after each task (after reset).
    worker_after: list[tuple[str, str | None, bool]] = field(default_factory=list)

    @property
    def eager(self) -> bool:
        return self.mode.startswith("eager")

    def result(self, task_id: str) -> AsyncResult:
        return self.celery.AsyncResult(task_id)


def _redis_db(url: str, number: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{number}", parts.query, parts.fragment))


def _purge_queue(celery_app: Celery) -> None:
    """Drop messages a previous, interrupted run left in our queue."""
    with celery_app.connection_for_write() as connection:
        queue = Queue(QUEUE).bind(connection.default_channel)
        queue.declare()
        queue.purge()


@pytest.fixture(scope="module", params=MODES)
def jobs_mode(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[Jobs]:
    mode: str = request.param
    broker, *flags = mode.split("-")
    strategy = "schema" if "schema" in flags else "column"
    celery_config: dict[str, t.Any] = {
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
        "worker_enable_remote_control": False,
    }
    if broker == "eager":
        celery_config.update(
            broker_url="memory://", result_backend="cache+memory://", task_always_eager=True
        )
    else:
        results_url = _redis_db(request.getfixturevalue("redis_url"), REDIS_DB)
        redis.Redis.from_url(results_url).flushdb()
        broker_url = results_url if broker == "redis" else request.getfixturevalue("rabbitmq_url")
        celery_config.update(
            broker_url=broker_url, result_backend=results_url, task_always_eager=False
        )

    source_calls: list[str] = []
    source_errors: list[Exception] = []

    def tenants_from_table() -> list[str]:
        source_calls.append(threading.current_thread().name)
        if source_errors:
            raise source_errors[0]
        with db.engine.connect() as connection:
            return list(connection.execute(db.select(Tenant.name)).scalars())

    if strategy == "schema":
        storage = {
            "SQLALCHEMY_DATABASE_URI": request.getfixturevalue("postgres_url"),
            "TENANT_JOBS_STRATEGY": "schema",
            "TENANT_JOBS_SCHEMA_FORMAT": SCHEMA_FORMAT,
        }
    else:
        database = tmp_path_factory.mktemp(f"jobs-{mode}") / "jobs.sqlite3"
        storage = {"SQLALCHEMY_DATABASE_URI": f"sqlite:///{database}"}
    if "signed" in flags:
        storage["TENANT_JOBS_SIGNING_KEY"] = SIGNING_KEY
    app = jobs_app.create_app(
        TENANT_JOBS_TENANTS=tenants_from_table, CELERY=celery_config, **storage
    )
    with app.app_context():
        _create_storage(strategy)
        engine = db.engine
    celery_app: TenantCelery = app.extensions["celery"]
    jobs = Jobs(mode, app, jobs_app.tenant_jobs, celery_app, source_calls, source_errors)

    def count_tenant_queries(conn: t.Any, cursor: t.Any, statement: str, *_: t.Any) -> None:
        if "jobs_tenant" in statement:
            jobs.tenant_queries.append(statement)

    def record_start(task: CeleryTask | None = None, task_id: str = "", **_: t.Any) -> None:
        if task is not None and task.app is celery_app:
            jobs.started.setdefault(task_id, []).append((current_tenant(), has_app_context()))

    def record_after(task: CeleryTask | None = None, **_: t.Any) -> None:
        if (
            task is not None
            and task.app is celery_app
            and (threading.current_thread() is not threading.main_thread())
            and runs.current() is None  # not a run inside another task's (see its test)
        ):
            jobs.worker_after.append((task.name, current_tenant(), has_app_context()))

    # Connected after flask_tenant_jobs.worker's receivers, so they run after the restore
    # (task_prerun) and after the reset (task_postrun).
    event.listen(engine, "before_cursor_execute", count_tenant_queries)
    task_prerun.connect(record_start, weak=False)
    task_postrun.connect(record_after, weak=False)
    try:
        if broker == "eager":
            yield jobs
        else:
            _purge_queue(celery_app)
            root = logging.getLogger()
            root_level, root_handlers = root.level, root.handlers[:]
            try:
                with start_worker(
                    celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=30
                ):
                    yield jobs
            finally:  # the embedded worker configured the root logger: give it back
                root.setLevel(root_level)
                root.handlers[:] = root_handlers
    finally:
        task_prerun.disconnect(record_start)
        task_postrun.disconnect(record_after)
        event.remove(engine, "before_cursor_execute", count_tenant_queries)
        if strategy == "schema":
            with app.app_context():
                _drop_storage()


def _create_storage(strategy: str) -> None:
    """The known-tenants table and, with the schema strategy, one schema per tenant."""
    if strategy != "schema":
        db.create_all()
    else:
        shared = [Tenant.__table__]
        db.metadata.create_all(db.engine, tables=shared)
        _drop_storage()
        for name in TENANTS:
            jobs_app.tenant_jobs.create(name)
    db.session.add_all(Tenant(name=name) for name in TENANTS)
    db.session.commit()


def _drop_storage() -> None:
    """Drop what a schema-strategy mode made (also what an interrupted run left)."""
    for name in TENANTS:
        jobs_app.tenant_jobs.drop(name)
    db.session.execute(db.delete(Tenant))
    db.session.commit()


@pytest.fixture
def jobs(jobs_mode: Jobs) -> t.Iterator[Jobs]:
    """The mode, with its app context pushed and its Celery app current; checks for leaks."""
    jobs_mode.celery.set_current()
    jobs_mode.celery.set_default()
    HANDLER_CALLS.clear()
    first_record = len(jobs_mode.worker_after)
    with jobs_mode.app.app_context():
        yield jobs_mode
        assert current_tenant() is None, "the test left a tenant behind"
    leaked = [
        record
        for record in jobs_mode.worker_after[first_record:]
        if record[1:] != (None, False) and record[0] not in SECOND_HANDLER_ROUND
    ]
    assert not leaked, f"a worker thread kept a tenant or app context after a task: {leaked}"


@pytest.fixture
def published(jobs: Jobs) -> t.Iterator[list[dict[str, t.Any]]]:
    """The headers of every message published during the test (eager runs publish none)."""
    headers_seen: list[dict[str, t.Any]] = []

    def record(
        sender: str | None = None, headers: dict[str, t.Any] | None = None, **_: t.Any
    ) -> None:
        headers_seen.append({"task": sender, **(headers or {})})

    before_task_publish.connect(record, weak=False)
    try:
        yield headers_seen
    finally:
        before_task_publish.disconnect(record)


# -- Helpers ------------------------------------------------------------------------------


def wait(result: t.Any) -> t.Any:
    """The result's value, waiting at most ``TIMEOUT`` seconds."""
    return result.get(timeout=TIMEOUT)


def assert_observed(observation: Observation, tenant: str | None, label: t.Any = ...) -> None:
    """The task saw ``tenant`` both as ``current_tenant()`` and as its request header."""
    assert observation["tenant"] == tenant, observation
    assert observation["header"] == tenant, observation
    if label is not ...:
        assert observation["label"] == label, observation


def seen_rows(**filters: t.Any) -> list[Seen]:
    """The ``Seen`` rows of every tenant, read tenant by tenant (which both strategies
    allow; ``without_tenant()`` reaches them all only with the column strategy)."""
    return [row for _ in jobs_app.tenant_jobs.each() for row in Seen.query.filter_by(**filters)]


def assert_next_plain_task_sees_no_tenant(jobs: Jobs) -> None:
    """A plain task sent now sees no tenant; on the solo worker it also runs after all
    tasks sent before it, so their handlers have finished when this returns."""
    assert_observed(wait(plain_observe.delay("after")), None, "after")
    assert current_tenant() is None


def deliver_unchecked(jobs: Jobs, name: str, args: tuple[t.Any, ...], **options: t.Any) -> t.Any:
    """Get a message to the worker without the sender-side tenant checks.

    With a worker: publish through the base ``Celery.send_task``. Eager: run it
    through the base ``Task.apply`` (what a worker would do with such a message).
    In the signed modes the tenant the headers name is signed as the app would sign
    it, so that the message meets the worker's other checks.
    """
    if jobs.celery.tenant_signer is not None:
        options = signed_like_the_app(jobs, name, options)
    if jobs.eager:
        return CeleryTask.apply(jobs.celery.tasks[name], args, **options)
    return Celery.send_task(jobs.celery, name, args, **options)


def signed_like_the_app(jobs: Jobs, name: str, options: dict[str, t.Any]) -> dict[str, t.Any]:
    """``options`` whose tenant header (top level or nested) is signed for task ``name``."""
    headers = dict(options.get("headers") or {})
    nested = dict(headers.get("headers") or {})
    level = headers if HEADER in headers else nested
    if HEADER not in level:
        return options
    task_id = options.get("task_id") or str(uuid.uuid4())
    signer = t.cast(Signer, jobs.celery.tenant_signer)
    level[signature_header(HEADER)] = signer.sign(name, task_id, level[HEADER])
    if level is nested:
        headers["headers"] = nested
    return {**options, "task_id": task_id, "headers": headers}


# -- Capture at the call site ---------------------------------------------------------------

SIGNATURE_FACTORIES: dict[str, t.Callable[[str], Signature]] = {
    "s": lambda label: observe_task.s(label),
    "si": lambda label: observe_task.si(label),
    "signature": lambda label: observe_task.signature((label,)),
    "subtask": lambda label: observe_task.subtask((label,)),
}


@pytest.mark.parametrize("factory", SIGNATURE_FACTORIES.values(), ids=SIGNATURE_FACTORIES.keys())
def test_signature_carries_the_tenant_it_was_made_in(
    jobs: Jobs, factory: t.Callable[[str], Signature]
) -> None:
    with jobs.ext.switch("acme"):
        made_in_acme = [factory(f"sig-{i}") for i in range(4)]
    assert all(sig.options["headers"][HEADER] == "acme" for sig in made_in_acme)

    outside = made_in_acme[0].apply_async()
    with jobs.ext.switch("globex"):
        in_globex = made_in_acme[1].delay()
        applied_here = made_in_acme[2].apply()
    applied_outside = made_in_acme[3].apply()

    assert_observed(wait(outside), "acme", "sig-0")
    assert_observed(wait(in_globex), "acme", "sig-1")
    assert_observed(wait(applied_here), "acme", "sig-2")
    assert_observed(wait(applied_outside), "acme", "sig-3")
    assert_next_plain_task_sees_no_tenant(jobs)


def test_signature_made_outside_a_tenant_has_no_header_and_takes_the_sending_tenant(
    jobs: Jobs,
) -> None:
    sig = observe_task.s("late")
    assert HEADER not in (sig.options.get("headers") or {})
    with pytest.raises(NoTenantError):
        sig.delay()
    with jobs.ext.switch("initech"):
        result = sig.delay()
    assert_observed(wait(result), "initech", "late")


def test_delay_and_apply_async_capture_the_current_tenant(jobs: Jobs) -> None:
    with jobs.ext.switch("acme"):
        delayed = observe_task.delay("delay")
        with jobs.ext.switch("globex"):
            sent = observe_task.apply_async(("apply_async",))
        assert current_tenant() == "acme"
        applied = observe_task.apply(("apply",))
    assert_observed(wait(delayed), "acme", "delay")
    assert_observed(wait(sent), "globex", "apply_async")
    assert_observed(wait(applied), "acme", "apply")
    assert_next_plain_task_sees_no_tenant(jobs)


def test_explicit_header_names_the_tenant(jobs: Jobs) -> None:
    with jobs.ext.switch("acme"):
        explicit = observe_task.apply_async(("explicit",), headers={HEADER: "globex"})
        explicit_apply = observe_task.apply(("explicit-apply",), headers={HEADER: "initech"})
    from_nowhere = observe_task.apply_async(("no-tenant",), headers={HEADER: "initech"})
    assert_observed(wait(explicit), "globex", "explicit")
    assert_observed(wait(explicit_apply), "initech", "explicit-apply")
    assert_observed(wait(from_nowhere), "initech", "no-tenant")


def test_other_headers_are_kept_next_to_the_tenant(
    jobs: Jobs, published: list[dict[str, t.Any]]
) -> None:
    with jobs.ext.switch("acme"):
        result = observe_task.apply_async(("x",), headers={"trace": "abc"})
    assert_observed(wait(result), "acme", "x")
    if not jobs.eager:
        assert {"trace": "abc", HEADER: "acme"}.items() <= published[0].items()


def test_send_task_by_name_captures_the_current_tenant(
    jobs: Jobs, published: list[dict[str, t.Any]]
) -> None:
    assert observe_task.name == OBSERVE
    assert OBSERVE in jobs.celery.tasks
    with pytest.raises(NoTenantError):
        jobs.celery.send_task(OBSERVE, ("nobody",))
    assert published == []

    if jobs.eager:
        # send_task publishes even in eager mode (Celery warns); no worker runs it here.
        with jobs.ext.switch("acme"), pytest.warns(AlwaysEagerIgnored):
            jobs.celery.send_task(OBSERVE, ("by-name",))
        assert [h[HEADER] for h in published] == ["acme"]
        return

    with jobs.ext.switch("acme"):
        by_name = jobs.celery.send_task(OBSERVE, ("by-name",))
        explicit = jobs.celery.send_task(OBSERVE, ("explicit",), headers={HEADER: "globex"})
        plain = jobs.celery.send_task("tests.jobs_app.plain_observe", ("plain",))
    assert_observed(wait(by_name), "acme", "by-name")
    assert_observed(wait(explicit), "globex", "explicit")
    assert_observed(wait(plain), None, "plain")
    assert [h.get(HEADER) for h in published] == ["acme", "globex", None]


# -- Errors at the call site ----------------------------------------------------------------

SENDERS_WITHOUT_TENANT: dict[str, t.Callable[[Jobs], t.Any]] = {
    "delay": lambda jobs: observe_task.delay("x"),
    "apply_async": lambda jobs: observe_task.apply_async(("x",)),
    "apply": lambda jobs: observe_task.apply(("x",)),
    "signature.delay": lambda jobs: observe_task.s("x").delay(),
    "send_task": lambda jobs: jobs.celery.send_task(OBSERVE, ("x",)),
    "chain": lambda jobs: (observe_task.s("x") | observe_task.s()).apply_async(),
    "group": lambda jobs: group(observe_task.s(1), observe_task.s(2)).apply_async(),
    "chord": lambda jobs: chord([observe_task.s(1)], observe_task.s()).apply_async(),
}


@pytest.mark.parametrize("send", SENDERS_WITHOUT_TENANT.values(), ids=SENDERS_WITHOUT_TENANT.keys())
def test_sending_with_no_current_tenant_raises_no_tenant_error(
    jobs: Jobs, published: list[dict[str, t.Any]], send: t.Callable[[Jobs], t.Any]
) -> None:
    runs_before = len(jobs.started)
    with pytest.raises(NoTenantError, match="needs a current tenant"):
        send(jobs)
    assert published == []
    assert len(jobs.started) == runs_before, "a task ran although sending was refused"


@pytest.mark.parametrize("inside", [None, "acme"], ids=["outside", "inside-acme"])
def test_unknown_tenant_in_headers_raises_tenant_not_found(
    jobs: Jobs, published: list[dict[str, t.Any]], inside: str | None
) -> None:
    runs_before = len(jobs.started)
    with jobs.ext.switch(inside):
        with pytest.raises(TenantNotFoundError) as raised:
            observe_task.apply_async(("x",), headers={HEADER: "nope"})
        assert raised.value.tenant == "nope"
        with pytest.raises(TenantNotFoundError):
            observe_task.apply(("x",), headers={HEADER: "nope"})
        with pytest.raises(TenantNotFoundError):
            jobs.celery.send_task(OBSERVE, ("x",), headers={HEADER: "nope"})
        with pytest.raises(TenantNotFoundError):
            observe_task.s("x").set(headers={HEADER: "nope"}).delay()
    assert published == []
    assert len(jobs.started) == runs_before


@pytest.mark.parametrize(
    "name", ["Acme", "acme'; DROP TABLE seen; --", "", "-acme", "a" * 64, "bücher", 42]
)
def test_malformed_tenant_in_headers_raises_invalid_tenant_name(
    jobs: Jobs, published: list[dict[str, t.Any]], name: object
) -> None:
    with jobs.ext.switch("acme"):
        with pytest.raises(InvalidTenantNameError):
            observe_task.apply_async(("x",), headers={HEADER: name})
        with pytest.raises(InvalidTenantNameError):
            observe_task.apply(("x",), headers={HEADER: name})
        with pytest.raises(InvalidTenantNameError):  # regression: send_task did not check
            jobs.celery.send_task(OBSERVE, ("x",), headers={HEADER: name})
    assert published == []


def test_task_enqueued_is_sent_once_per_task(jobs: Jobs) -> None:
    enqueued: list[tuple[str, str]] = []

    def on_enqueued(sender: Flask, task: str, tenant: str, **_: t.Any) -> None:
        enqueued.append((task, tenant))

    with task_enqueued.connected_to(on_enqueued, sender=jobs.app), jobs.ext.switch("acme"):
        wait(observe_task.delay("once"))
        wait(observe_task.apply_async(("once",), headers={HEADER: "globex"}))
        wait(observe_task.apply(("run-here",)))  # run here, not sent
    # Regression: eager apply_async ends in apply(), and the signal fired twice.
    assert enqueued == [(OBSERVE, "acme"), (OBSERVE, "globex")]


# -- Worker-side validation -------------------------------------------------------------------


def test_eager_call_site_refuses_an_unknown_tenant_before_anything_runs(jobs: Jobs) -> None:
    """What ``.apply()`` (and eager ``delay``) does with a bad header: refuse it at once."""
    runs_before = len(jobs.started)
    with pytest.raises(TenantNotFoundError):
        write_seen.apply(("refused",), headers={HEADER: "nope"})
    with pytest.raises(InvalidTenantNameError):
        write_seen.apply(("refused",), headers={HEADER: "Nope!"})
    assert len(jobs.started) == runs_before
    assert seen_rows(label="refused") == []


BAD_MESSAGES: dict[str, tuple[dict[str, t.Any] | None, type[TenantError], str | None]] = {
    # id: (headers, error, the tenant the tenant_not_found signal names or None: no signal)
    "unknown": ({HEADER: "nope"}, TenantNotFoundError, "nope"),
    "malformed": (
        {HEADER: "Acme'; DROP TABLE seen; --"},
        InvalidTenantNameError,
        "Acme'; DROP TABLE seen; --",
    ),
    "empty": ({HEADER: ""}, InvalidTenantNameError, ""),
    "missing": (None, NoTenantError, None),
}


@pytest.mark.parametrize(
    "headers, error, signalled", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys()
)
def test_message_with_a_bad_tenant_fails_before_the_body_and_the_worker_carries_on(
    jobs: Jobs,
    headers: dict[str, t.Any] | None,
    error: type[TenantError],
    signalled: str | None,
) -> None:
    not_found: list[tuple[str, str]] = []

    def on_not_found(sender: Flask, tenant: str, source: str, **_: t.Any) -> None:
        not_found.append((tenant, source))

    label = f"bad-{error.__name__}-{len(jobs.started)}"
    with tenant_not_found.connected_to(on_not_found, sender=jobs.app):
        writer = deliver_unchecked(jobs, "tests.jobs_app.write_seen", (label,), headers=headers)
        outcome = writer.get(timeout=TIMEOUT, propagate=False)
        # A task that would retry (and record on_retry) is not retried: its body never runs.
        retrier = deliver_unchecked(
            jobs, "tests.jobs_app.retry_then_observe", (label,), headers=headers
        )
        retrier_outcome = retrier.get(timeout=TIMEOUT, propagate=False)
        assert_next_plain_task_sees_no_tenant(jobs)

    assert writer.state == "FAILURE"
    assert isinstance(outcome, error), outcome
    assert retrier.state == "FAILURE"
    assert isinstance(retrier_outcome, error), retrier_outcome
    # The error comes back whole from the result backend (regression: it came back with its
    # message nested in itself and the whole message as its ``tenant``).
    assert outcome.tenant == signalled
    if signalled is not None:
        assert repr(signalled) in str(outcome)
        assert str(outcome).count(repr(signalled)) == 1
    assert HANDLER_CALLS == [("on_failure", None)], "retried, or handled in a tenant"
    assert not_found == ([(signalled, "task")] * 2 if signalled is not None else [])
    assert seen_rows(label=label) == [], "the body ran"
    with jobs.ext.switch("globex"):
        assert_observed(wait(observe_task.delay("next")), "globex", "next")


def test_a_tenant_created_elsewhere_is_found_by_the_worker_at_once(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's cache does not know the new tenant yet: a miss reads the source again."""
    monkeypatch.setattr(worker_module, "MISS_RELOAD_SECONDS", 0.0)
    with jobs.app.app_context():
        jobs.ext.create("newco")  # its storage (a schema with the schema strategy)
        assert jobs.ext.exists("newco") is False  # the names are cached without it
        db.session.add(Tenant(name="newco"))
        db.session.commit()
    try:
        result = deliver_unchecked(
            jobs, observe_task.name, ("hello",), headers={"tenant_for_job": "newco"}
        )
        assert_observed(wait(result), "newco", "hello")
    finally:
        with jobs.app.app_context():
            db.session.execute(db.delete(Tenant).where(Tenant.name == "newco"))
            db.session.commit()
            jobs.ext.drop("newco")


@pytest.mark.parametrize(
    "error",
    [
        TenantNotFoundError("nope"),
        InvalidTenantNameError("Nope!"),
        InvalidTenantNameError(42),
        NoTenantError("Sending the tenant task 'x'"),
    ],
    ids=repr,
)
def test_tenant_errors_round_trip_through_the_result_backend(
    jobs: Jobs, error: TenantError
) -> None:
    backend = jobs.celery.backend
    stored = backend.decode(backend.encode(backend.prepare_exception(error)))
    rebuilt = backend.exception_to_python(stored)
    assert type(rebuilt) is type(error)
    assert str(rebuilt) == str(error)
    assert rebuilt.tenant == error.tenant


def test_nested_headers_dict_still_names_the_tenant(jobs: Jobs) -> None:
    """Tools such as sentry-sdk nest a ``headers`` dict into the message headers."""
    result = deliver_unchecked(jobs, OBSERVE, ("nested",), headers={"headers": {HEADER: "acme"}})
    assert wait(result)["tenant"] == "acme"
    assert_next_plain_task_sees_no_tenant(jobs)


# -- Restore and reset ----------------------------------------------------------------------


def test_task_runs_in_its_tenant_inside_an_app_context(jobs: Jobs) -> None:
    with jobs.ext.switch("initech"):
        result = observe_task.delay("restored")
    assert_observed(wait(result), "initech", "restored")
    assert jobs.started[result.id] == [("initech", True)]


def test_plain_task_sent_inside_a_tenant_runs_with_none(jobs: Jobs) -> None:
    with jobs.ext.switch("acme"):
        result = plain_observe.delay("plain")
        assert current_tenant() == "acme"
    assert_observed(wait(result), None, "plain")
    assert jobs.started[result.id] == [(None, True)]


def test_handlers_run_in_the_task_tenant(jobs: Jobs) -> None:
    with jobs.ext.switch("acme"):
        retried = retry_then_observe.delay("handlers")
    assert wait(retried)["retries"] == 2
    with jobs.ext.switch("globex"):
        failed = fail.delay("handlers")
    with pytest.raises(RuntimeError, match="failing in globex"):
        wait(failed)
    assert_next_plain_task_sees_no_tenant(jobs)
    assert HANDLER_CALLS == [
        ("on_retry", "acme"),
        ("on_retry", "acme"),
        ("on_success", "acme"),
        ("on_failure", "globex"),
    ]


OUTCOMES: dict[str, tuple[t.Any, bool]] = {
    # id: (task, whether a result is stored to wait for)
    "return": (observe_task, True),
    "exception": (fail, True),
    "retry": (retry_then_observe, True),
    "autoretry": (autoretry_observe, True),
    "replace": (replace_with_observe, True),
    "reject": (reject, False),
    "ignore": (ignore, False),
}


@pytest.mark.parametrize("task, stores_result", OUTCOMES.values(), ids=OUTCOMES.keys())
def test_no_tenant_is_left_after_any_outcome(jobs: Jobs, task: t.Any, stores_result: bool) -> None:
    first_record = len(jobs.worker_after)
    with jobs.ext.switch("globex"):
        result = task.delay("outcome")
        assert current_tenant() == "globex", "an eager run changed the caller's tenant"
    if stores_result:
        try:
            assert_observed(wait(result), "globex", "outcome")
        except RuntimeError as error:
            assert task is fail and "failing in globex" in str(error)
    assert_next_plain_task_sees_no_tenant(jobs)
    assert jobs.started[result.id], "the task did not run"
    assert all(run == ("globex", True) for run in jobs.started[result.id])
    if not jobs.eager:  # the plain task's postrun may still be running when its result is in
        wait_until(lambda: jobs.worker_after[-1][0] == "tests.jobs_app.plain_observe", TIMEOUT,
                   "the plain task's task_postrun", lambda: str(jobs.worker_after[first_record:]))
        after = jobs.worker_after[first_record:]
        assert after[-1] == ("tests.jobs_app.plain_observe", None, False)
        assert all(record[1:] == (None, False) for record in after), after


def test_reject_and_ignore_results(jobs: Jobs) -> None:
    """Both run in their tenant; what their results say differs between eager and worker."""
    with jobs.ext.switch("acme"):
        rejected = reject.delay("r")
        ignored = ignore.delay("i")
    assert_next_plain_task_sees_no_tenant(jobs)
    assert jobs.started[rejected.id] == [("acme", True)]
    assert jobs.started[ignored.id] == [("acme", True)]
    if jobs.eager:
        assert (rejected.state, ignored.state) == ("REJECTED", "IGNORED")
    else:  # the worker marks a message rejected without requeue as failed
        assert (rejected.state, ignored.state) == ("FAILURE", "PENDING")


KINDS = ("observe", "write_seen", "retry", "fail", "plain", "autoretry")


def test_sixty_alternating_tasks_never_leak_a_tenant(jobs: Jobs) -> None:
    """Tenants, failures, retries and plain tasks interleaved on one worker thread."""
    first_record = len(jobs.worker_after)
    sent: list[tuple[str, str, t.Any]] = []
    for i in range(60):
        tenant, kind = TENANTS[i % 3], KINDS[(i // 3) % len(KINDS)]
        label = f"alt-{i}"
        with jobs.ext.switch(tenant):
            task = {
                "observe": observe_task,
                "write_seen": write_seen,
                "retry": retry_then_observe,
                "fail": fail,
                "plain": plain_observe,
                "autoretry": autoretry_observe,
            }[kind]
            sent.append((tenant, kind, task.delay(label)))

    expected_handlers: Counter[tuple[str, str | None]] = Counter()
    for i, (tenant, kind, result) in enumerate(sent):
        if kind == "fail":
            with pytest.raises(RuntimeError, match=f"failing in {tenant}$"):
                wait(result)
            expected_handlers[("on_failure", tenant)] += 1
            continue
        observation = wait(result)
        assert_observed(observation, None if kind == "plain" else tenant, f"alt-{i}")
        if kind == "write_seen":
            assert observation["visible"] == [tenant]
        if kind == "retry":
            expected_handlers[("on_retry", tenant)] += 2
            expected_handlers[("on_success", tenant)] += 1
    assert_next_plain_task_sees_no_tenant(jobs)

    assert Counter(HANDLER_CALLS) == expected_handlers
    rows = [row for row in seen_rows() if row.label.startswith("alt-")]
    assert sorted(row.label for row in rows) == sorted(
        f"alt-{i}" for i, (_, kind, _) in enumerate(sent) if kind == "write_seen"
    )
    assert all(row.believed == row.tenant_id for row in rows)
    if not jobs.eager:
        after = jobs.worker_after[first_record:]
        retries = sum(
            2 if kind == "retry" else 1 if kind == "autoretry" else 0 for _, kind, _ in sent
        )
        assert len(after) >= len(sent) + retries  # every run ended here
        assert all(record[1:] == (None, False) for record in after)


# -- Propagation ----------------------------------------------------------------------------


def test_self_retry_keeps_the_tenant(jobs: Jobs) -> None:
    with jobs.ext.switch("acme"):
        result = retry_then_observe.delay("retry")
    observation = wait(result)
    assert_observed(observation, "acme", "retry")
    assert observation["retries"] == 2
    assert all(run == ("acme", True) for run in jobs.started[result.id])
    assert len(jobs.started[result.id]) == 3


def test_autoretry_keeps_the_tenant(jobs: Jobs) -> None:
    with jobs.ext.switch("globex"):
        result = autoretry_observe.delay("autoretry")
    assert_observed(wait(result), "globex", "autoretry")
    assert jobs.started[result.id] == [("globex", True)] * 2


def test_countdown_and_eta_keep_the_tenant(jobs: Jobs) -> None:
    with jobs.ext.switch("acme"):
        counted = observe_task.apply_async(("countdown",), countdown=1)
    with jobs.ext.switch("globex"):
        eta = datetime.now(timezone.utc) + timedelta(seconds=1)
        timed = observe_task.apply_async(("eta",), eta=eta)
    assert_observed(wait(counted), "acme", "countdown")
    assert_observed(wait(timed), "globex", "eta")
    assert_next_plain_task_sees_no_tenant(jobs)


@dataclass(frozen=True)
class Placement:
    """Where a canvas is built, where it is applied, and an explicit header at apply time."""

    built_in: str | None
    applied_in: str | None
    header: str | None = None

    @property
    def expected(self) -> str:
        tenant = self.header or self.built_in or self.applied_in
        assert tenant is not None
        return tenant

    def options(self) -> dict[str, t.Any]:
        return {"headers": {HEADER: self.header}} if self.header else {}


PLACEMENTS = {
    "built-in-acme-applied-outside": Placement("acme", None),
    "built-outside-applied-in-globex": Placement(None, "globex"),
    "built-in-acme-applied-in-globex": Placement("acme", "globex"),
    "built-outside-applied-in-acme-with-initech-header": Placement(None, "acme", "initech"),
}
HOW = ["apply_async", "apply"]


def run_canvas(
    jobs: Jobs, placement: Placement, how: str, build: t.Callable[[], Signature]
) -> t.Any:
    with jobs.ext.switch(placement.built_in):
        canvas = build()
    with jobs.ext.switch(placement.applied_in):
        result = getattr(canvas, how)(**placement.options())
    return wait(result)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_chain_keeps_the_tenant_in_every_step(jobs: Jobs, placement: Placement, how: str) -> None:
    last = run_canvas(
        jobs,
        placement,
        how,
        lambda: observe_task.s("first") | observe_task.s() | observe_task.s(),
    )
    second = last["label"]
    first = second["label"]
    for step in (first, second, last):
        assert_observed(step, placement.expected)
    assert first["label"] == "first"
    assert_next_plain_task_sees_no_tenant(jobs)


def test_chain_steps_signed_in_different_tenants_run_in_their_own(jobs: Jobs) -> None:
    steps = []
    for tenant in TENANTS:
        with jobs.ext.switch(tenant):
            steps.append(observe_task.s(tenant) if not steps else observe_task.s())
    last = wait(chain(*steps).apply_async())
    assert_observed(last, "initech")
    assert_observed(last["label"], "globex")
    assert_observed(last["label"]["label"], "acme", "acme")


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_group_keeps_the_tenant_in_every_task(jobs: Jobs, placement: Placement, how: str) -> None:
    observations = run_canvas(
        jobs, placement, how, lambda: group([observe_task.s(i) for i in range(3)])
    )
    assert [o["label"] for o in observations] == [0, 1, 2]
    for observation in observations:
        assert_observed(observation, placement.expected)
    assert_next_plain_task_sees_no_tenant(jobs)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_chord_keeps_the_tenant_in_header_and_body(
    jobs: Jobs, placement: Placement, how: str, request: pytest.FixtureRequest
) -> None:
    if placement.header and (how == "apply" or jobs.eager):
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="Celery's chord.apply() (used in eager mode too) drops its options, "
                "so headers= given to the chord never reach its tasks; they run in the "
                "caller's tenant. Build the chord inside switch() instead.",
            )
        )
    body = run_canvas(
        jobs,
        placement,
        how,
        lambda: chord([observe_task.s(i) for i in range(3)], observe_task.s()),
    )
    assert_observed(body, placement.expected)
    header = body["label"]
    assert sorted(o["label"] for o in header) == [0, 1, 2]
    for observation in header:
        assert_observed(observation, placement.expected)
    assert_next_plain_task_sees_no_tenant(jobs)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_link_runs_in_the_tenant(jobs: Jobs, placement: Placement, how: str) -> None:
    callback_ids: list[str] = []

    def build() -> Signature:
        callback = observe_task.s()
        callback_ids.append(callback.freeze().id)
        return observe_task.signature(("linked",), link=callback)

    main = run_canvas(jobs, placement, how, build)
    assert_observed(main, placement.expected, "linked")
    callback = wait(jobs.result(callback_ids[0]))
    assert_observed(callback, placement.expected, main)
    assert_next_plain_task_sees_no_tenant(jobs)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_link_error_runs_in_the_tenant(jobs: Jobs, placement: Placement, how: str) -> None:
    errback_ids: list[str] = []

    def build() -> Signature:
        errback = errback_observe.s()
        errback_ids.append(errback.freeze().id)
        return fail.signature(("errback",), link_error=errback)

    with pytest.raises(RuntimeError, match=f"failing in {placement.expected}$"):
        run_canvas(jobs, placement, how, build)
    assert_observed(wait(jobs.result(errback_ids[0])), placement.expected, "errback")
    assert_next_plain_task_sees_no_tenant(jobs)
    assert [("on_failure", placement.expected)] == HANDLER_CALLS


def test_task_sent_from_inside_a_task_keeps_the_tenant(jobs: Jobs) -> None:
    with jobs.ext.switch("globex"):
        parent = spawn_child.delay("child")
    child_id = wait(parent)
    assert_observed(wait(jobs.result(child_id)), "globex", "child")
    assert_next_plain_task_sees_no_tenant(jobs)


def test_replaced_task_keeps_the_tenant(jobs: Jobs) -> None:
    with jobs.ext.switch("initech"):
        replaced = replace_with_observe.delay("replacement")
    observation = wait(replaced)
    assert observation["task"] == "observe_task"
    assert_observed(observation, "initech", "replacement")
    assert_next_plain_task_sees_no_tenant(jobs)


# -- Fan-out to every tenant ----------------------------------------------------------------


@pytest.mark.parametrize("inside", [None, "acme"], ids=["outside", "inside-acme"])
def test_delay_for_each_tenant_runs_once_in_every_tenant(jobs: Jobs, inside: str | None) -> None:
    with jobs.ext.switch(inside):
        results = observe_task.delay_for_each_tenant("each")
        assert current_tenant() == inside
    observations = [wait(result) for result in results]
    assert sorted(o["tenant"] for o in observations) == list(TENANTS)
    for observation in observations:
        assert_observed(observation, observation["tenant"], "each")
    assert_next_plain_task_sees_no_tenant(jobs)


def test_apply_for_each_tenant_runs_in_the_named_subset(jobs: Jobs) -> None:
    results = write_seen.apply_for_each_tenant(("subset",), tenants=["initech", "globex"])
    observations = [wait(result) for result in results]
    assert [o["tenant"] for o in observations] == ["initech", "globex"]
    for observation in observations:
        assert_observed(observation, observation["tenant"], "subset")
        assert observation["visible"] == [observation["tenant"]]


def test_apply_for_each_tenant_refuses_an_unknown_tenant_before_sending_any(
    jobs: Jobs, published: list[dict[str, t.Any]]
) -> None:
    runs_before = len(jobs.started)
    with pytest.raises(TenantNotFoundError):
        observe_task.apply_for_each_tenant(("subset",), tenants=["acme", "nope"])
    with pytest.raises(InvalidTenantNameError):
        observe_task.apply_for_each_tenant(("subset",), tenants=["acme", "Not A Name"])
    assert published == []
    assert len(jobs.started) == runs_before


# -- Cached tenant lookups ------------------------------------------------------------------


def test_fifty_tasks_look_the_tenants_up_at_most_once(jobs: Jobs) -> None:
    jobs.ext.refresh()
    jobs.source_calls.clear()
    jobs.tenant_queries.clear()
    results = []
    for i in range(50):
        with jobs.ext.switch(TENANTS[i % 3]):
            results.append((TENANTS[i % 3], observe_task.delay(i)))
    for tenant, result in results:
        assert_observed(wait(result), tenant)
    assert len(jobs.source_calls) <= 1, jobs.source_calls
    assert len(jobs.tenant_queries) == len(jobs.source_calls)


def test_a_failing_tenant_source_keeps_serving_the_last_good_list(jobs: Jobs) -> None:
    """Regression: with the source failing, every lookup called it again and every task
    failed; now the last good list serves, and the source is read once per period."""
    jobs.ext.refresh()
    with jobs.ext.switch("acme"):
        wait(observe_task.delay("before"))
    jobs.source_errors.append(OSError("tenants table unreachable"))
    try:
        jobs.ext.refresh()  # as if the cache had expired
        jobs.source_calls.clear()
        results = []
        for i in range(20):
            with jobs.ext.switch(TENANTS[i % 3]):
                results.append((TENANTS[i % 3], observe_task.delay(i)))
        for tenant, result in results:
            assert_observed(wait(result), tenant)
        assert len(jobs.source_calls) == 1, jobs.source_calls
    finally:
        jobs.source_errors.clear()
        jobs.ext.refresh()


# -- Logging --------------------------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_log_records_carry_the_tenant_inside_a_task_and_a_dash_outside(jobs: Jobs) -> None:
    handler = ListHandler()
    handler.addFilter(TenantLogFilter())
    logger = logging.getLogger(TASK_LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # the embedded worker sets the root logger to ERROR
    try:
        with jobs.ext.switch("globex"):
            wait(log_tenant.delay("in-task"))
        logger.warning("outside")
        assert_next_plain_task_sees_no_tenant(jobs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [(r.getMessage(), r.tenant) for r in handler.records] == [  # type: ignore[attr-defined]
        ("log_tenant in-task", "globex"),
        ("outside", "-"),
    ]
    if not jobs.eager:
        assert handler.records[0].threadName != threading.main_thread().name


# -- Cross-tenant plain tasks ---------------------------------------------------------------


@pytest.mark.parametrize("inside", [None, "acme"], ids=["outside", "inside-acme"])
def test_cross_tenant_task_visits_every_tenant_and_leaves_none(
    jobs: Jobs, inside: str | None
) -> None:
    with jobs.ext.switch(inside):
        result = each_tenant_maintenance.delay()
        assert current_tenant() == inside
    assert wait(result) == list(TENANTS)
    assert jobs.started[result.id] == [(None, True)]
    assert_next_plain_task_sees_no_tenant(jobs)


# -- map, starmap and chunks --------------------------------------------------------------

WRAPPERS: dict[str, t.Callable[[], Signature]] = {
    "map": lambda: observe_task.map(["m1", "m2"]),
    "starmap": lambda: observe_task.starmap([("s1",), ("s2",)]),
    "chunks": lambda: observe_task.chunks([("c1",), ("c2",), ("c3",)], 2),
}
WRAPPER_LABELS = {"map": ["m1", "m2"], "starmap": ["s1", "s2"], "chunks": ["c1", "c2", "c3"]}
WRAPPER_CASES = [
    pytest.param(kind, how, id=f"{kind}-{how}")
    for kind in WRAPPERS
    for how in HOW
    if not (kind == "chunks" and how == "apply")  # chunks.apply() returns a GroupResult
]


def flatten(observations: list[t.Any]) -> list[Observation]:
    """A map's observations, or a chunks group's lists of them, as one list."""
    return [o for item in observations for o in (item if isinstance(item, list) else [item])]


@pytest.mark.parametrize(("kind", "how"), WRAPPER_CASES)
@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_map_starmap_and_chunks_run_in_the_tenant(
    jobs: Jobs,
    published: list[dict[str, t.Any]],
    placement: Placement,
    kind: str,
    how: str,
) -> None:
    """Regression: Celery's wrapper tasks (celery.map...) carried no tenant, and the body
    they call in place ran with none."""
    observations = flatten(run_canvas(jobs, placement, how, WRAPPERS[kind]))
    assert sorted(o["label"] for o in observations) == WRAPPER_LABELS[kind]
    assert {o["tenant"] for o in observations} == {placement.expected}
    wrappers = [h for h in published if str(h["task"]).startswith("celery.")]
    assert [h[HEADER] for h in wrappers] == [placement.expected] * len(wrappers)
    assert_next_plain_task_sees_no_tenant(jobs)


WRITING_WRAPPERS: dict[str, t.Callable[[str], Signature]] = {
    "map": lambda label: write_seen.map([label]),
    "starmap": lambda label: write_seen.starmap([(label,)]),
    "chunks": lambda label: write_seen.chunks([(label,)], 1),
}


@pytest.mark.parametrize("make", WRITING_WRAPPERS.values(), ids=WRITING_WRAPPERS.keys())
def test_map_starmap_and_chunks_with_no_tenant_are_refused(
    jobs: Jobs, published: list[dict[str, t.Any]], make: t.Callable[[str], Signature]
) -> None:
    """Sent with no tenant: refused where they are sent (eager: when run), the body never runs."""
    label = f"refused-{uuid.uuid4().hex[:8]}"
    with pytest.raises(NoTenantError):
        wait(make(label).apply_async())
    assert published == []
    assert seen_rows(label=label) == []


@pytest.mark.parametrize(
    ("headers", "error"),
    [(None, NoTenantError), ({HEADER: "nope"}, TenantNotFoundError)],
    ids=["no-tenant", "unknown-tenant"],
)
def test_a_wrapper_message_without_a_valid_tenant_is_refused_by_the_worker(
    jobs: Jobs, headers: dict[str, str] | None, error: type[TenantError]
) -> None:
    """A celery.map message that bypassed the sender's checks: the body never runs."""
    label = f"unchecked-{uuid.uuid4().hex[:8]}"
    body = {"task": dict(write_seen.s()), "it": [label]}
    result = deliver_unchecked(jobs, "celery.map", (), kwargs=body, headers=headers)
    assert isinstance(result.get(timeout=TIMEOUT, propagate=False), error)
    assert seen_rows(label=label) == []
    assert_next_plain_task_sees_no_tenant(jobs)


def test_a_tenant_task_called_directly_needs_a_current_tenant(jobs: Jobs) -> None:
    with pytest.raises(NoTenantError, match="Running the tenant task"):
        observe_task("direct")
    with jobs.ext.switch("acme"):
        assert observe_task("direct")["tenant"] == "acme"


def test_map_inside_a_chain_runs_in_the_tenant(jobs: Jobs) -> None:
    with jobs.ext.switch("initech"):
        pipeline = chain(observe_task.si("first"), observe_task.map(["after"]))
    observations = wait(pipeline.apply_async())
    assert [(o["tenant"], o["label"]) for o in observations] == [("initech", "after")]
    assert_next_plain_task_sees_no_tenant(jobs)


def test_map_as_a_replacement_in_a_chord_header_and_with_a_link(jobs: Jobs) -> None:
    with jobs.ext.switch("globex"):
        replaced = replace_with_map.delay("replaced")
        header = [observe_task.map(["h1"]), observe_task.starmap([("h2",)])]
        fan_in = chord(header, collect_tenants.s())
        linked = observe_task.map(["linked"]).apply_async(link=record_link.si({"label": "m"}))
    assert [o["tenant"] for o in wait(replaced)] == ["globex", "globex"]
    with jobs.ext.switch("acme"):  # applied in another tenant: the signatures' tenant wins
        collected = wait(fan_in.apply_async())
    assert collected == [["globex"], ["globex"], "globex"]
    assert [o["tenant"] for o in wait(linked)] == ["globex"]
    assert_next_plain_task_sees_no_tenant(jobs)
    assert ("link:m", "globex") in {(row.label, row.tenant_id) for row in seen_rows()}


# -- linked signatures are the caller's ----------------------------------------------------


def test_a_reused_link_signature_is_never_changed(jobs: Jobs) -> None:
    """Regression: the first tenant was written into a module-level ``link=`` signature,
    so the second tenant's callback ran in the first tenant, with the second's result."""
    run = uuid.uuid4().hex[:8]
    callback = record_link.s()
    for tenant in ("acme", "globex"):
        with jobs.ext.switch(tenant):
            wait(observe_task.apply_async((f"{run}-{tenant}",), link=callback))
    results = observe_task.apply_for_each_tenant((f"{run}-each",), link=[callback])
    for result in results:
        wait(result)
    assert_next_plain_task_sees_no_tenant(jobs)  # the callbacks have run too
    assert callback.options == {}
    rows = {(row.label, row.tenant_id, row.believed) for row in seen_rows()}
    for tenant in ("acme", "globex"):
        assert (f"link:{run}-{tenant}", tenant, tenant) in rows
    assert {(label, tenant) for label, tenant, _ in rows if label == f"link:{run}-each"} == {
        (f"link:{run}-each", tenant) for tenant in TENANTS
    }


def test_a_reused_link_error_signature_is_never_changed(jobs: Jobs) -> None:
    errback = record_link.s()
    failed: dict[str, str] = {}
    for tenant in ("globex", "initech"):
        with jobs.ext.switch(tenant):
            result = fail.apply_async((tenant,), link_error=errback)
        with pytest.raises(RuntimeError, match=f"failing in {tenant}$"):
            wait(result)
        failed[tenant] = result.id
    expected = {(f"link:{task_id}", tenant) for tenant, task_id in failed.items()}
    deadline = time.monotonic() + TIMEOUT  # errbacks are sent after the result is stored
    while not expected <= {(r.label, r.tenant_id) for r in seen_rows()}:
        assert time.monotonic() < deadline, "the errbacks did not run in their tenants"
        time.sleep(0.05)
    assert_next_plain_task_sees_no_tenant(jobs)
    assert errback.options == {}


# -- handlers that raise ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning")
def test_handlers_run_again_after_a_raising_on_failure_keep_the_tenant(jobs: Jobs) -> None:
    """Regression: when on_failure raises, Celery runs the errbacks and on_failure again
    after task_postrun; they ran with no tenant and no app context."""
    RAISING_HANDLER_CALLS.clear()
    rounds = 1 if jobs.eager else 2  # eager runs raise the handler's error to the caller
    with jobs.ext.switch("globex"):
        if jobs.eager:
            with pytest.raises(RuntimeError, match="on_failure raised"):
                fail_with_raising_handler.apply_async(("x",), link_error=record_errback.s())
        else:
            result = fail_with_raising_handler.apply_async(("x",), link_error=record_errback.s())
            assert isinstance(result.get(timeout=TIMEOUT, propagate=False), Exception)
    deadline = time.monotonic() + TIMEOUT
    while len(RAISING_HANDLER_CALLS) < 2 * rounds and time.monotonic() < deadline:
        time.sleep(0.05)  # the errbacks of the second round are tasks of their own
    assert_next_plain_task_sees_no_tenant(jobs)
    kinds = Counter(kind for kind, _, _ in RAISING_HANDLER_CALLS)
    assert kinds == {"on_failure": rounds, "errback": rounds}, RAISING_HANDLER_CALLS
    assert {(tenant, app_context) for _, tenant, app_context in RAISING_HANDLER_CALLS} == {
        ("globex", True)
    }


@pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning")
def test_failure_handlers_after_a_raising_on_retry_keep_the_tenant(jobs: Jobs) -> None:
    RAISING_HANDLER_CALLS.clear()
    with jobs.ext.switch("initech"):
        if jobs.eager:
            with pytest.raises(RuntimeError, match="on_retry raised"):
                retry_with_raising_handler.delay("x")
        else:
            result = retry_with_raising_handler.delay("x")
    if not jobs.eager:
        assert isinstance(result.get(timeout=TIMEOUT, propagate=False), Exception)
    assert_next_plain_task_sees_no_tenant(jobs)
    expected = ["on_retry"] if jobs.eager else ["on_retry", "on_failure"]
    assert [kind for kind, _, _ in RAISING_HANDLER_CALLS][: len(expected)] == expected
    assert {(tenant, ctx) for _, tenant, ctx in RAISING_HANDLER_CALLS} == {("initech", True)}


# -- runs inside runs ------------------------------------------------------------------------


def test_a_run_in_place_inside_a_task_gives_the_task_its_tenant_back(jobs: Jobs) -> None:
    """A tenant task run with ``apply()`` inside another task's body is a run of its own,
    in its own tenant; when it ends, the outer task has its tenant, request and app
    context back, and a direct call of a tenant task runs in the outer task's tenant."""
    with jobs.ext.switch("acme"):
        seen = wait(observe_around_a_nested_run.delay("globex"))
    assert seen["before"] == {"task": "observe_around_a_nested_run", "tenant": "acme",
                              "header": "acme", "label": "before"}
    assert (seen["nested"]["tenant"], seen["nested"]["header"]) == ("globex", "globex")
    assert (seen["called"]["tenant"], seen["called"]["label"]) == ("acme", "called")
    assert seen["after"] == {**seen["before"], "label": "after"}
    assert seen["app_context"] is True
    assert_next_plain_task_sees_no_tenant(jobs)


def test_message_headers_cannot_reach_the_workers_own_state(jobs: Jobs) -> None:
    """Celery makes every message header an attribute of the task's request, where the
    worker used to keep a run's state (the tenant error, the restore, the tracer's
    call): headers named like those made a tenant task fail with a ``TypeError`` and a
    plain task's ``task_postrun`` raise. The run's state lives elsewhere now."""
    forged = {"_tenant_jobs_error": "forged", "_tenant_jobs_traced_call": True,
              "_tenant_jobs_restore": ["forged"]}
    with jobs.ext.switch("acme"):
        seen = wait(deliver_unchecked(jobs, "tests.jobs_app.observe_task", ("forged",),
                                      headers={**forged, HEADER: "acme"}))
    assert_observed(seen, "acme", "forged")
    plain = wait(plain_observe.apply_async(("forged",), headers=forged))
    assert_observed(plain, None, "forged")
    assert_next_plain_task_sees_no_tenant(jobs)


# -- the unscoped flag ends with its task ---------------------------------------------------


def test_tasks_start_and_end_with_scoping_on(jobs: Jobs) -> None:
    """Regression: ``without_tenant()`` around a call, or left open inside a task, made the
    task (or every later task on the thread) read every tenant's rows."""
    run = uuid.uuid4().hex[:8]
    for tenant in ("acme", "globex"):
        with jobs.ext.switch(tenant):
            wait(write_seen.delay(f"{run}-{tenant}"))
    with jobs.ext.switch("globex"), jobs.ext.without_tenant():
        inside = wait(scoping_of_task.apply(("inside",)))
        assert is_unscoped()
    assert inside == {"tenant": "globex", "unscoped": False, "visible": ["globex"]}
    with jobs.ext.switch("acme"):
        assert wait(leak_unscoped.delay()) is True
        after = wait(scoping_of_task.delay())
    assert after == {"tenant": "acme", "unscoped": False, "visible": ["acme"]}
    assert wait(plain_scoping.delay()) is False
    assert not is_unscoped()


# -- fan-out with a pinned tenant -------------------------------------------------------


def test_a_tenant_pinned_in_the_headers_means_that_tenant_only(jobs: Jobs) -> None:
    """Regression: apply_for_each_tenant overwrote a pinned header and ran in every tenant."""
    results = observe_task.apply_for_each_tenant(("pinned",), headers={HEADER: "globex"})
    assert [wait(result)["tenant"] for result in results] == ["globex"]
    results = observe_task.apply_for_each_tenant(
        ("pinned",), headers={HEADER: "globex"}, tenants=["globex"]
    )
    assert [wait(result)["tenant"] for result in results] == ["globex"]
    with pytest.raises(ConfigurationError, match="pin the task to tenant 'globex'"):
        observe_task.apply_for_each_tenant(("x",), headers={HEADER: "globex"}, tenants=["acme"])
    with pytest.raises(TenantNotFoundError):
        observe_task.apply_for_each_tenant(("x",), headers={HEADER: "nope"})
    with pytest.raises(ConfigurationError, match="single string"):
        observe_task.apply_for_each_tenant(("x",), tenants="acme")
    assert_next_plain_task_sees_no_tenant(jobs)
