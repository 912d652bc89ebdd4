"""What the observability integrations cost per request, per task and per SQL statement.

Every row times the same work with the integration off (baseline) and on (measured),
interleaved in one process, in batches of one to five operations (so that many of
them run uninterrupted on a busy machine; the best batch of each side counts). "Off"
connects nothing: it is what an app without the library installed runs. The
libraries' own instrumentation (OpenTelemetry's Flask and Celery instrumentation,
sentry-sdk's integrations) is set up on both sides, so the ratio is what this
package adds to them.

* OpenTelemetry: a tenant request (test client) with no tracing configured (the API's
  non-recording span) and with the Flask instrumentation recording into the SDK; a
  tenant task through Celery's tracer (what a worker runs per message) with the Celery
  instrumentation installed but not set up, and recording.
* Sentry (initialised, events kept in memory): a tenant request and a tenant task that
  report nothing, and capturing an error event.
* SQL comments (``TENANT_JOBS_SQL_COMMENT``): a SELECT of 10 of 10,000 rows and a
  one-row primary-key SELECT (Core, on a connection held open), on SQLite and
  PostgreSQL (``BENCH_POSTGRES_URL``; tables ``bench_obs_*`` are dropped afterwards);
  target <= 1.05x.
* Prometheus: a tenant task through the tracer, and publishing one (in-memory broker).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import typing as t

import sqlalchemy as sa
from celery.app import trace as celery_trace
from celery.signals import after_task_publish, before_task_publish, task_postrun, task_prerun
from flask import Flask, got_request_exception, request_finished
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_tenant_jobs import TenantJobs, TenantScoped, tenant_task

from . import Row, compare, without_autovacuum
from .core import POSTGRES_URL, postgres_reachable

TENANTS = [f"t{i:02d}" for i in range(10)]
TENANT = "t03"
SQL_TARGET = 1.05
#: Seconds each row takes.
SECONDS = 3.0

db = SQLAlchemy()
tenant_jobs = TenantJobs()


class Entry(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "bench_obs_entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[int] = mapped_column(index=True)


@tenant_task(name="bench.observability.noop")
def noop() -> None:
    """Does nothing, in a tenant."""


Receivers = list[tuple[t.Any, t.Callable[..., t.Any], t.Any]]


def _app(url: str = "sqlite://", **config: t.Any) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test", SQLALCHEMY_DATABASE_URI=url, TENANT_JOBS_TENANTS=TENANTS,
        CELERY={"broker_url": "memory://", "result_backend": "cache+memory://",
                "task_ignore_result": True},
        **config,
    )
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    app.add_url_rule("/ping", "ping", lambda: "pong")
    return app


@contextlib.contextmanager
def _disconnected(receivers: Receivers) -> t.Iterator[None]:
    """Run the block with these ``(signal, receiver, sender)`` disconnected: integration off."""
    for signal, receiver, sender in receivers:
        if sender is None:
            signal.disconnect(receiver)
        else:
            signal.disconnect(receiver, sender)
    try:
        yield
    finally:
        for signal, receiver, sender in receivers:
            if sender is None:
                signal.connect(receiver)
            else:
                signal.connect(receiver, sender)


def _on_off(name: str, work: t.Callable[[], object], receivers: Receivers, number: int,
            target: float | None = None) -> Row:
    """``work`` with ``receivers`` disconnected (baseline) and connected (measured)."""
    return compare(name, work, work, number=number, target=target, seconds=SECONDS,
                   baseline_context=lambda: _disconnected(receivers))


def _request(app: Flask) -> t.Callable[[], object]:
    client = app.test_client()

    def request() -> None:
        response = client.get("/ping", headers={"Host": f"{TENANT}.example.test"})
        assert response.status_code == 200

    return request


def _task_run(app: Flask) -> t.Callable[[], object]:
    """One tenant task through Celery's tracer, as a worker runs a message (the tracer
    looked up when called, so that sentry-sdk's wrapping of it applies)."""
    task = app.extensions["celery"].tasks["bench.observability.noop"]
    trace = celery_trace.build_tracer(task.name, task, app=task.app, eager=False, propagate=False)
    request = {"id": "id", "delivery_info": {}, "ignore_result": True,
               "tenant_for_job": TENANT}
    return lambda: trace("id", (), {}, dict(request))


def _otel_rows() -> list[Row]:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    from flask_tenant_jobs.integrations import otel

    provider = TracerProvider()
    provider.add_span_processor(SpanProcessor())  # records, exports nowhere
    untraced, traced = _app(), _app()
    FlaskInstrumentor().instrument_app(traced, tracer_provider=provider)

    def request_receivers(app: Flask) -> Receivers:
        return [(request_finished, otel.tag_request_span, app),
                (got_request_exception, otel.tag_request_span, app)]

    task_receivers: Receivers = [
        (before_task_publish, otel._tag_publish_span, None),
        (after_task_publish, otel._tag_publish_span, None),
        (task_prerun, otel._tag_run_span_at_start, None),
        (task_postrun, otel._tag_run_span_at_end, None),
    ]
    rows = [
        _on_off("OpenTelemetry: request, no tracing configured", _request(untraced),
                request_receivers(untraced), number=2),
        _on_off("OpenTelemetry: request, Flask instrumentation recording", _request(traced),
                request_receivers(traced), number=2),
        _on_off("OpenTelemetry: task in the worker, Celery instrumentation installed, not set up",
                _task_run(traced), task_receivers, number=5),
    ]
    CeleryInstrumentor().instrument(tracer_provider=provider)
    try:
        rows.append(_on_off("OpenTelemetry: task in the worker, Celery instrumentation "
                            "recording", _task_run(traced), task_receivers, number=5))
    finally:
        CeleryInstrumentor().uninstrument()
        FlaskInstrumentor().uninstrument_app(traced)
    return rows


def _sentry_rows() -> list[Row]:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.flask import FlaskIntegration
    from sentry_sdk.scope import global_event_processors
    from sentry_sdk.transport import Transport

    from flask_tenant_jobs.integrations.sentry import tag_event

    class Keep(Transport):  # type: ignore[misc]
        def capture_envelope(self, envelope: t.Any) -> None:
            pass

    sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", transport=Keep,
                    integrations=[FlaskIntegration(), CeleryIntegration()])
    app = _app()

    @contextlib.contextmanager
    def without_tag() -> t.Iterator[None]:
        global_event_processors.remove(tag_event)
        try:
            yield
        finally:
            global_event_processors.append(tag_event)

    def capture() -> None:
        try:
            raise ValueError("bench")
        except ValueError:
            sentry_sdk.capture_exception()

    @contextlib.contextmanager
    def in_tenant(off: bool) -> t.Iterator[None]:
        with app.app_context(), tenant_jobs.switch(TENANT), (
            without_tag() if off else contextlib.nullcontext()
        ):
            yield

    try:
        return [
            compare("Sentry: request that reports nothing", _request(app), _request(app),
                    seconds=SECONDS, number=2, baseline_context=without_tag),
            compare("Sentry: task in the worker that reports nothing", _task_run(app),
                    _task_run(app), seconds=SECONDS, number=5, baseline_context=without_tag),
            compare("Sentry: capturing an error event in a tenant", capture, capture,
                    seconds=SECONDS, number=1, baseline_context=lambda: in_tenant(True),
                    measured_context=lambda: in_tenant(False)),
        ]
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


def _sql_rows(label: str, url: str, number: int) -> list[Row]:
    plain, commented = _app(url), _app(url, TENANT_JOBS_SQL_COMMENT=True)
    with plain.app_context():
        db.drop_all()
        db.create_all()
        without_autovacuum(db.engine, Entry.__tablename__)
        with db.engine.begin() as connection:
            connection.execute(sa.insert(Entry.__table__), [
                {"tenant_id": tenant, "bucket": i % 100}
                for tenant in TENANTS for i in range(1000)
            ])
        with tenant_jobs.switch(TENANT):
            pk = db.session.scalars(sa.select(Entry.id).limit(1)).one()

    # One connection per side, held for the whole row, so that what is timed is the
    # statement (no pool checkout or BEGIN inside a batch).
    connections = {}
    for app in (plain, commented):
        with app.app_context():
            connections[app] = db.engine.connect()
    entries = Entry.__table__
    ten = sa.select(entries).where(entries.c.bucket == 7, entries.c.tenant_id == TENANT)
    by_key = sa.select(entries.c.bucket).where(entries.c.id == pk)

    def run(app: Flask, statement: sa.Select[t.Any], rows: int) -> t.Callable[[], object]:
        connection = connections[app]

        def execute() -> None:
            assert len(connection.execute(statement).all()) == rows

        return execute

    def in_tenant(app: Flask) -> t.Callable[[], t.ContextManager[object]]:
        @contextlib.contextmanager
        def entered() -> t.Iterator[None]:
            with app.app_context(), tenant_jobs.switch(TENANT):
                yield

        return entered

    contexts = {"baseline_context": in_tenant(plain), "measured_context": in_tenant(commented)}
    rows = [
        compare(f"SQL comment, {label}: select 10 of 10,000 rows", run(plain, ten, 10),
                run(commented, ten, 10), seconds=SECONDS, number=number, target=SQL_TARGET,
                **contexts),
        compare(f"SQL comment, {label}: one-row primary-key SELECT", run(plain, by_key, 1),
                run(commented, by_key, 1), seconds=SECONDS, number=number * 2,
                target=SQL_TARGET, **contexts),
    ]
    for connection in connections.values():
        connection.close()
    for app in (plain, commented):
        with app.app_context():
            if app is plain:
                db.drop_all()
            db.engine.dispose()
    return rows


def _prometheus_rows() -> list[Row]:
    from flask_tenant_jobs.integrations import prometheus

    app = _app()
    receivers: Receivers = [
        (before_task_publish, prometheus._count_sent, None),
        (task_prerun, prometheus._count_started, None),
        (task_postrun, prometheus._count_finished, None),
    ]
    task = app.extensions["celery"].tasks["bench.observability.noop"]

    @contextlib.contextmanager
    def in_tenant() -> t.Iterator[None]:
        with app.app_context(), tenant_jobs.switch(TENANT):
            yield

    def publish() -> None:
        task.apply_async(queue="bench-observability")

    rows = [
        _on_off("Prometheus: task in the worker", _task_run(app), receivers, number=5),
        compare("Prometheus: publishing a task (in-memory broker)", publish, publish,
                seconds=SECONDS, number=2, measured_context=in_tenant,
                baseline_context=lambda: _stacked(in_tenant(), receivers)),
    ]
    with app.extensions["celery"].connection_for_write() as connection:
        connection.default_channel.queue_delete("bench-observability")
    return rows


@contextlib.contextmanager
def _stacked(outer: t.ContextManager[object], receivers: Receivers) -> t.Iterator[None]:
    with outer, _disconnected(receivers):
        yield


def run() -> list[Row]:
    """All observability benchmarks (about 30 s)."""
    rows = _otel_rows() + _prometheus_rows()
    with tempfile.TemporaryDirectory() as tmp:
        rows += _sql_rows("SQLite", f"sqlite:///{tmp}/bench.sqlite3", number=2)
    if postgres_reachable(POSTGRES_URL):
        rows += _sql_rows("PostgreSQL", POSTGRES_URL, number=1)
    else:
        print(f"PostgreSQL not reachable at {POSTGRES_URL}: skipped", file=sys.stderr)
    rows += _sentry_rows()
    return rows

