"""Sentry: errors of requests and tasks carry the tag ``tenant``.

sentry-sdk is initialised with its Flask and Celery integrations and a transport that
keeps the envelopes in memory (no network). Tasks run in a real worker (solo pool, a
thread of this process) on Redis (database ``TEST_SENTRY_REDIS_DB``, default 4,
flushed) and eagerly. Sentry's Celery integration also nests its own ``headers`` in
every message, so these runs check that tenants are still restored under it.
"""

from __future__ import annotations

import logging
import os
import time
import typing as t

import pytest
import redis
import sentry_sdk
from celery import chain
from celery.app import trace as trace_module
from celery.contrib.testing.worker import start_worker
from celery.worker.consumer import consumer as consumer_module
from flask import Flask
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.flask import FlaskIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport

from flask_tenant_jobs import current_tenant

from . import observability_app
from .worker_processes import redis_db_url, wait_until

pytestmark = pytest.mark.filterwarnings(
    # celery's Redis result backend calls redis-py's deprecated setex
    "ignore:Call to deprecated setex:DeprecationWarning"
)
REDIS_DB = int(os.environ.get("TEST_SENTRY_REDIS_DB", "4"))
QUEUE = "flask-tenant-jobs-sentry"
TIMEOUT = 20.0

Event = dict[str, t.Any]


class CapturingTransport(Transport):  # type: ignore[misc]
    """Keeps every error event instead of sending it."""

    events: t.ClassVar[list[Event]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        event = envelope.get_event()
        if event is not None:
            self.events.append(event)


@pytest.fixture(scope="module")
def sentry(monkeypatch_module: pytest.MonkeyPatch) -> t.Iterator[None]:
    """sentry-sdk initialised for this module, then switched off again.

    Sentry's Celery integration wraps tasks by patching ``celery.app.trace.build_tracer``;
    the in-process worker's consumer imported that function by name when the test
    modules were collected, before this ``init``, so it is pointed at the patched one
    (a prefork child, or a worker started after ``init``, gets it anyway).
    """
    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        transport=CapturingTransport,
        # error logs as events, as sentry-sdk 2 makes them by default (3 does not): the
        # error of an errback run inside the failed task is only logged by Celery
        integrations=[
            FlaskIntegration(),
            CeleryIntegration(),
            LoggingIntegration(event_level=logging.ERROR),
        ],
    )
    monkeypatch_module.setattr(consumer_module, "build_tracer", trace_module.build_tracer)
    try:
        yield
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


@pytest.fixture(scope="module")
def monkeypatch_module() -> t.Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module", params=["eager", "worker"])
def mode_app(request: pytest.FixtureRequest, sentry: None) -> t.Iterator[Flask]:
    """An app whose tasks run eagerly, or in a real worker on Redis."""
    if request.param == "eager":
        yield observability_app.create_app(CELERY={"task_always_eager": True})
        return
    url = redis_db_url(request.getfixturevalue("redis_url"), REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    app = observability_app.create_app(
        CELERY={"broker_url": url, "result_backend": url, "task_default_queue": QUEUE,
                "worker_enable_remote_control": False},
    )
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        with start_worker(app.extensions["celery"], pool="solo", perform_ping_check=False,
                          shutdown_timeout=30):
            yield app
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


@pytest.fixture
def jobs(mode_app: Flask) -> t.Iterator[Flask]:
    mode_app.extensions["celery"].set_current()
    with mode_app.app_context():
        yield mode_app
        assert current_tenant() is None


@pytest.fixture
def events() -> list[Event]:
    CapturingTransport.events.clear()
    return CapturingTransport.events


def _task(app: Flask, name: str) -> t.Any:
    return app.extensions["celery"].tasks[name]


def _error_tags(events: list[Event], count: int) -> dict[str, str | None]:
    """Exception type -> tenant tag of the first ``count`` error events (waiting for them)."""
    wait_until(lambda: len(events) >= count, TIMEOUT, f"{count} Sentry events",
               lambda: str([_summary(e) for e in events]))
    time.sleep(0.1)  # nothing more is coming
    return dict(_summary(event) for event in events)


def _summary(event: Event) -> tuple[str, str | None]:
    values = (event.get("exception") or {}).get("values") or [{}]
    kind = values[-1].get("type") or event.get("logentry", {}).get("message", "?")
    return str(kind), (event.get("tags") or {}).get("tenant")


# -- Requests -----------------------------------------------------------------------------


def _request_app() -> Flask:
    app = observability_app.create_app()
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.get("/boom")
    def boom() -> str:
        raise KeyError(current_tenant() or "-")

    return app


def test_request_errors_carry_the_tenant(sentry: None, events: list[Event]) -> None:
    client = _request_app().test_client()
    assert client.get("http://acme.example.test/boom").status_code == 500
    assert _error_tags(events, 1) == {"KeyError": "acme"}


def test_no_tenant_no_tag_and_nothing_left_from_the_request_before(
    sentry: None, events: list[Event]
) -> None:
    client = _request_app().test_client()
    client.get("http://globex.example.test/boom")
    client.get("http://example.test/boom")
    assert [_summary(event) for event in events] == [("KeyError", "globex"), ("KeyError", None)]


def test_events_captured_by_hand_in_a_switch(sentry: None, events: list[Event]) -> None:
    app = observability_app.create_app()
    with app.app_context(), observability_app.tenant_jobs.switch("initech"):
        sentry_sdk.capture_message("by hand")
    sentry_sdk.capture_message("outside")
    assert [(e["message"], (e.get("tags") or {}).get("tenant")) for e in events] == [
        ("by hand", "initech"),
        ("outside", None),
    ]


# -- Tasks --------------------------------------------------------------------------------


def test_task_errors_carry_the_tenant(jobs: Flask, events: list[Event]) -> None:
    with observability_app.tenant_jobs.switch("globex"):
        result = _task(jobs, "obs.boom").delay()
    with pytest.raises(RuntimeError, match="boom in globex"):
        result.get(timeout=TIMEOUT)
    assert _error_tags(events, 1) == {"RuntimeError": "globex"}


def test_a_failing_chain_step(jobs: Flask, events: list[Event]) -> None:
    report, boom = _task(jobs, "obs.report"), _task(jobs, "obs.boom")
    with observability_app.tenant_jobs.switch("initech"):
        result = chain(report.s(), report.s(), boom.s()).delay()
    with pytest.raises(RuntimeError, match="boom in initech"):
        result.get(timeout=TIMEOUT)
    assert _error_tags(events, 1) == {"RuntimeError": "initech"}


def test_failing_errbacks(jobs: Flask, events: list[Event]) -> None:
    """An errback taking the task id runs as a task of its own; one taking
    ``(request, exc, traceback)`` runs inside the failed task, and Celery logs its error."""
    boom, errback_boom = _task(jobs, "obs.boom"), _task(jobs, "obs.errback_boom")
    with observability_app.tenant_jobs.switch("acme"):
        result = boom.apply_async(link_error=[errback_boom.s(), boom.si("errback")])
    with pytest.raises(RuntimeError):
        result.get(timeout=TIMEOUT)
    _error_tags(events, 3)
    assert sorted(_summary(event) for event in events) == [
        ("LookupError", "acme"),  # the errback run inside the task (logged by Celery)
        ("RuntimeError", "acme"),  # the task
        ("RuntimeError", "acme"),  # the errback run as a task
    ]


def test_tenants_are_restored_under_sentry_s_headers(jobs: Flask, events: list[Event]) -> None:
    report = _task(jobs, "obs.report")
    for name in observability_app.TENANTS:
        with observability_app.tenant_jobs.switch(name):
            assert report.delay().get(timeout=TIMEOUT) == name
    assert events == []
