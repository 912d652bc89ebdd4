"""OpenTelemetry: the tenant on request spans and on task spans, where sent and where run.

Spans come from opentelemetry-instrumentation-flask and -celery and are recorded by
the SDK's in-memory exporter. Tasks run in a real worker (solo pool, a thread of this
process) on Redis (database ``TEST_OTEL_REDIS_DB``, default 14, flushed) and eagerly.
The Celery instrumentation and this library both listen to Celery's signals; each
worker case runs with the instrumentation's receivers connected before ours and after.
"""

from __future__ import annotations

import logging
import os
import time
import typing as t
import uuid

import pytest
import redis
from celery import chain, group
from celery.contrib.testing.worker import start_worker
from celery.signals import after_task_publish, before_task_publish, task_postrun, task_prerun
from flask import Flask
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from flask_tenant_jobs import current_tenant
from flask_tenant_jobs.integrations import otel

from . import observability_app
from .worker_processes import redis_db_url, wait_until

pytestmark = pytest.mark.filterwarnings(
    # celery's Redis result backend calls redis-py's deprecated setex
    "ignore:Call to deprecated setex:DeprecationWarning"
)
REDIS_DB = int(os.environ.get("TEST_OTEL_REDIS_DB", "14"))
QUEUE = "flask-tenant-jobs-otel"
HEADER = "tenant_for_job"
TIMEOUT = 20.0
_OUR_RECEIVERS = [
    (before_task_publish, otel._tag_publish_span),
    (after_task_publish, otel._tag_publish_span),
    (task_prerun, otel._tag_run_span_at_start),
    (task_postrun, otel._tag_run_span_at_end),
]


@pytest.fixture(scope="module")
def exporter() -> t.Iterator[InMemorySpanExporter]:
    """Celery spans of every app, recorded in memory for this module."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    exporter.provider = provider  # type: ignore[attr-defined]
    try:
        yield exporter
    finally:
        instrumentor.uninstrument()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


def _redis_app(redis_url: str) -> Flask:
    url = redis_db_url(redis_url, REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    return observability_app.create_app(
        CELERY={"broker_url": url, "result_backend": url, "task_default_queue": QUEUE,
                "worker_enable_remote_control": False},
    )


@pytest.fixture(scope="module", params=["eager", "worker, instrumentation first",
                                        "worker, ours first"])
def mode_app(
    request: pytest.FixtureRequest, exporter: InMemorySpanExporter
) -> t.Iterator[Flask]:
    """An app whose tasks run eagerly, or in a real worker with the Celery receivers
    of the instrumentation connected before ours, or after."""
    if request.param == "eager":
        yield observability_app.create_app(CELERY={"task_always_eager": True})
        return
    app = _redis_app(request.getfixturevalue("redis_url"))
    if request.param.endswith("instrumentation first"):
        for signal, receiver in _OUR_RECEIVERS:  # ours go last, after the instrumentation's
            signal.disconnect(receiver)
            signal.connect(receiver)
    else:
        CeleryInstrumentor().uninstrument()
        CeleryInstrumentor().instrument(tracer_provider=exporter.provider)  # type: ignore[attr-defined]
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
    """The mode's app with its app context pushed and its Celery app current."""
    mode_app.extensions["celery"].set_current()
    with mode_app.app_context():
        yield mode_app
        assert current_tenant() is None


def _task(app: Flask, name: str) -> t.Any:
    return app.extensions["celery"].tasks[name]


def _eager(app: Flask) -> bool:
    return bool(app.extensions["celery"].conf.task_always_eager)


def _tenants(spans: InMemorySpanExporter, name: str) -> list[str | None]:
    """The ``tenant`` attribute of each finished span called ``name``, in finishing order."""
    found: list[ReadableSpan] = [s for s in spans.get_finished_spans() if s.name == name]
    return [(s.attributes or {}).get("tenant") for s in found]  # type: ignore[misc]


def _wait_for(spans: InMemorySpanExporter, name: str, count: int) -> list[str | None]:
    """The tenants of ``count`` spans called ``name``, once that many have finished
    (a run span ends in ``task_postrun``, after the result is stored)."""
    wait_until(lambda: len(_tenants(spans, name)) >= count, TIMEOUT, f"{count} x {name}",
               lambda: str([s.name for s in spans.get_finished_spans()]))
    time.sleep(0.05)  # nothing more is coming
    return _tenants(spans, name)


def _sent(app: Flask, spans: InMemorySpanExporter, name: str, count: int) -> list[str | None]:
    """The tenants on the ``apply_async`` spans: ``count`` of them with a worker, none eagerly."""
    return [] if _eager(app) else _wait_for(spans, f"apply_async/{name}", count)


def _expected_sent(app: Flask, tenants: list[str | None]) -> list[str | None]:
    return [] if _eager(app) else tenants


# -- Tasks --------------------------------------------------------------------------------


def test_a_task_carries_its_tenant_where_sent_and_where_run(
    jobs: Flask, spans: InMemorySpanExporter
) -> None:
    with observability_app.tenant_jobs.switch("acme"):
        result = _task(jobs, "obs.report").delay()
    assert result.get(timeout=TIMEOUT) == "acme"
    assert _wait_for(spans, "run/obs.report", 1) == ["acme"]
    assert _sent(jobs, spans, "obs.report", 1) == _expected_sent(jobs, ["acme"])


def test_the_header_names_the_tenant_not_the_sender(
    jobs: Flask, spans: InMemorySpanExporter
) -> None:
    with observability_app.tenant_jobs.switch("acme"):
        result = _task(jobs, "obs.report").apply_async(headers={HEADER: "globex"})
    assert result.get(timeout=TIMEOUT) == "globex"
    assert _wait_for(spans, "run/obs.report", 1) == ["globex"]
    assert _sent(jobs, spans, "obs.report", 1) == _expected_sent(jobs, ["globex"])


def test_chain_steps_and_callbacks(jobs: Flask, spans: InMemorySpanExporter) -> None:
    report = _task(jobs, "obs.report")
    with observability_app.tenant_jobs.switch("initech"):
        workflow = chain(report.s(), report.s(), report.s())
        result = workflow.apply_async(link=report.si("callback"))
    assert result.get(timeout=TIMEOUT) == "initech"
    assert _wait_for(spans, "run/obs.report", 4) == ["initech"] * 4
    # the first step is sent from here, the next steps and the callback by the worker
    assert _sent(jobs, spans, "obs.report", 4) == _expected_sent(jobs, ["initech"] * 4)


def test_retries(jobs: Flask, spans: InMemorySpanExporter) -> None:
    with observability_app.tenant_jobs.switch("globex"):
        result = _task(jobs, "obs.flaky").delay()
    assert result.get(timeout=TIMEOUT) == 2
    assert _wait_for(spans, "run/obs.flaky", 3) == ["globex"] * 3
    assert _sent(jobs, spans, "obs.flaky", 3) == _expected_sent(jobs, ["globex"] * 3)


def test_failures_and_errbacks(jobs: Flask, spans: InMemorySpanExporter) -> None:
    boom, report = _task(jobs, "obs.boom"), _task(jobs, "obs.report")
    with observability_app.tenant_jobs.switch("acme"):
        result = boom.apply_async(link_error=report.s())
    with pytest.raises(RuntimeError):
        result.get(timeout=TIMEOUT)
    assert _wait_for(spans, "run/obs.boom", 1) == ["acme"]
    assert _wait_for(spans, "run/obs.report", 1) == ["acme"]  # the errback, a task of its own


def test_each_tenant_fan_out_with_no_tenant_current(
    jobs: Flask, spans: InMemorySpanExporter
) -> None:
    results = _task(jobs, "obs.report").apply_for_each_tenant()
    assert sorted(r.get(timeout=TIMEOUT) for r in results) == observability_app.TENANTS
    assert sorted(_wait_for(spans, "run/obs.report", 3)) == observability_app.TENANTS
    sent = _sent(jobs, spans, "obs.report", 3)
    assert sorted(t.cast(list[str], sent)) == _expected_sent(jobs, observability_app.TENANTS)


def test_plain_tasks_get_no_tenant(jobs: Flask, spans: InMemorySpanExporter) -> None:
    """Also when the message names one: a plain task runs with none."""
    plain = _task(jobs, "obs.plain_report")
    with observability_app.tenant_jobs.switch("acme"):
        results = [plain.delay(), plain.apply_async(headers={HEADER: "acme"})]
    assert [result.get(timeout=TIMEOUT) for result in results] == [None, None]
    assert _wait_for(spans, "run/obs.plain_report", 2) == [None, None]
    assert _sent(jobs, spans, "obs.plain_report", 2) == _expected_sent(jobs, [None, None])


def test_a_refused_tenant_tags_nothing(jobs: Flask, spans: InMemorySpanExporter) -> None:
    """A message naming an unknown tenant fails before its body; its span names no tenant."""
    celery_app = jobs.extensions["celery"]
    if _eager(jobs):
        pytest.skip("eager sends check the tenant before anything runs")
    from celery import Celery

    task_id = str(uuid.uuid4())
    Celery.send_task(celery_app, "obs.report", task_id=task_id, headers={HEADER: "nobody"})
    with pytest.raises(Exception, match="nobody"):
        celery_app.AsyncResult(task_id).get(timeout=TIMEOUT)
    assert _wait_for(spans, "run/obs.report", 1) == [None]


# -- Requests -----------------------------------------------------------------------------


def _traced_app(**config: t.Any) -> tuple[Flask, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=config.pop("sampler", None))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = observability_app.create_app(**config)
    FlaskInstrumentor().instrument_app(app, tracer_provider=provider)

    @app.get("/")
    def index() -> str:
        return current_tenant() or "-"

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    @app.get("/send")
    def send() -> str:  # an eager task naming another tenant, sent from this request
        task = app.extensions["celery"].tasks["obs.report"]
        return str(task.apply_async(headers={HEADER: "globex"}).get())

    return app, exporter


def _request_tenants(exporter: InMemorySpanExporter) -> list[str | None]:
    return [(s.attributes or {}).get("tenant") for s in exporter.get_finished_spans()
            if s.name.startswith("GET ")]


def test_request_spans_carry_the_tenant() -> None:
    app, exporter = _traced_app()
    client = app.test_client()
    assert client.get("http://acme.example.test/").text == "acme"
    assert client.get("http://example.test/").text == "-"
    assert client.get("http://nobody.example.test/").status_code == 404
    assert client.get("http://globex.example.test/").text == "globex"
    # the unknown tenant is answered (404) before the instrumentation starts a span
    assert _request_tenants(exporter) == ["acme", None, "globex"]


def test_request_spans_of_failed_requests() -> None:
    app, exporter = _traced_app()
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert app.test_client().get("http://acme.example.test/boom").status_code == 500
    app.config["PROPAGATE_EXCEPTIONS"] = True  # the error reaches the caller: no response
    with pytest.raises(RuntimeError):
        app.test_client().get("http://globex.example.test/boom")
    assert _request_tenants(exporter) == ["acme", "globex"]


def test_a_task_sent_from_a_request_keeps_the_request_span_s_tenant(
    exporter: InMemorySpanExporter,
) -> None:
    app, request_spans = _traced_app(CELERY={"task_always_eager": True})
    app.extensions["celery"].set_current()
    exporter.clear()
    assert app.test_client().get("http://acme.example.test/send").text == "globex"
    assert _request_tenants(request_spans) == ["acme"]
    assert _tenants(exporter, "run/obs.report") == ["globex"]


def test_the_attribute_name_is_a_setting() -> None:
    app, exporter = _traced_app(TENANT_JOBS_OTEL_ATTRIBUTE="app.tenant")
    app.test_client().get("http://acme.example.test/")
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes.get("app.tenant") == "acme"
    assert "tenant" not in span.attributes


def test_none_turns_it_off() -> None:
    app, exporter = _traced_app(TENANT_JOBS_OTEL_ATTRIBUTE=None)
    app.test_client().get("http://acme.example.test/")
    (span,) = exporter.get_finished_spans()
    assert "tenant" not in (span.attributes or {})


def test_spans_that_do_not_record_are_left_alone() -> None:
    app, exporter = _traced_app(sampler=ALWAYS_OFF)
    assert app.test_client().get("http://acme.example.test/").text == "acme"
    assert exporter.get_finished_spans() == ()
    untraced = observability_app.create_app()  # no instrumentation: the API's no-op span
    untraced.add_url_rule("/", "index", lambda: current_tenant() or "-")
    assert untraced.test_client().get("http://acme.example.test/").text == "acme"


@pytest.mark.parametrize("value", ["", 3, b"tenant"])
def test_a_bad_attribute_name_is_a_configuration_error(value: object) -> None:
    from flask_tenant_jobs import ConfigurationError

    with pytest.raises(ConfigurationError, match="TENANT_JOBS_OTEL_ATTRIBUTE"):
        observability_app.create_app(TENANT_JOBS_OTEL_ATTRIBUTE=value)


def test_group_members_each_carry_their_tenant(jobs: Flask, spans: InMemorySpanExporter) -> None:
    report = _task(jobs, "obs.report")
    with observability_app.tenant_jobs.switch("acme"):
        members = [report.s()]
    with observability_app.tenant_jobs.switch("globex"):
        members.append(report.s())
    result = group(members).apply_async()
    assert sorted(result.get(timeout=TIMEOUT)) == ["acme", "globex"]
    assert sorted(t.cast(list[str], _wait_for(spans, "run/obs.report", 2))) == ["acme", "globex"]
