"""Signed tenant headers (``TENANT_JOBS_SIGNING_KEY``) against a real worker on Redis.

The app signs with its first key and its worker checks against both; an intruder, a
plain Celery app on the same broker without the key, publishes hand-made messages.
Redis database ``TEST_SIGNING_REDIS_DB`` (default 8) is flushed and used. Chains,
groups, chords, retries, ``replace()``, map/starmap/chunks and ``apply_for_each_tenant``
with signing on are the ``*-signed`` modes of tests/test_jobs.py; beat is in
tests/test_workers.py.
"""

from __future__ import annotations

import logging
import os
import pickle
import typing as t
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery, Task
from celery.contrib.testing.worker import start_worker
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from kombu import Queue

from flask_tenant_jobs import (
    ConfigurationError,
    TenantJobs,
    TenantSignatureError,
    TenantTask,
    current_tenant,
    tenant_task,
)
from flask_tenant_jobs.sending import TenantCelery
from flask_tenant_jobs.signing import Signer, signature_header

from .worker_processes import redis_db_url

pytestmark = [
    pytest.mark.redis,
    pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning"),
]

HEADER = "tenant_for_job"
SIGNATURE = signature_header(HEADER)
NEW_KEY = "the-key-that-signs-now-0123456789"
OLD_KEY = b"the-key-that-signed-before-987654"
RETIRED_KEY = "a-key-no-longer-listed-5555555555"
REDIS_DB = int(os.environ.get("TEST_SIGNING_REDIS_DB", "8"))
QUEUE = f"ftj-signing-{uuid.uuid4().hex[:8]}"
TIMEOUT = 20.0
RECORD = "tests.test_signing.record"

db = SQLAlchemy()
tenant_jobs = TenantJobs()
#: (label, tenant, retries) of every body that ran; the solo worker runs in this process.
RUNS: list[tuple[t.Any, str | None, int]] = []
#: The labels ``on_retry`` was called for.
RETRIED: list[t.Any] = []


class RetryRecordingTask(TenantTask):
    """Records retries: a refused message must not be retried."""

    def on_retry(
        self, exc: Exception, task_id: str, args: t.Any, kwargs: t.Any, einfo: t.Any
    ) -> None:
        RETRIED.append(args[0] if args else None)


@tenant_task(
    name=RECORD,
    bind=True,
    base=RetryRecordingTask,
    autoretry_for=(Exception,),
    max_retries=3,
    default_retry_delay=0,
)
def record(self: Task, label: t.Any = None) -> dict[str, t.Any]:
    """Record the run; any error would be retried (autoretry_for=Exception)."""
    RUNS.append((label, current_tenant(), self.request.retries))
    return {"label": label, "tenant": current_tenant()}


def make_app(tmp_path: Path, broker: str = "memory://", **config: t.Any) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'signing.db'}",
        TENANT_JOBS_TENANTS=["acme", "globex"],
        CELERY={
            "broker_url": broker,
            "result_backend": broker if broker != "memory://" else "cache+memory://",
            "task_default_queue": QUEUE,
            "worker_hijack_root_logger": False,
            "worker_enable_remote_control": False,
        },
        **config,
    )
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app


@pytest.fixture(scope="module")
def signed(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[tuple[Flask, TenantCelery, Celery]]:
    """The signing app, its real worker (Redis, solo pool) and the intruder."""
    url = redis_db_url(redis_url, REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    app = make_app(
        tmp_path_factory.mktemp("signing"), url, TENANT_JOBS_SIGNING_KEY=[NEW_KEY, OLD_KEY]
    )
    celery_app: TenantCelery = app.extensions["celery"]
    intruder = Celery("intruder", broker=url, backend=url, set_as_current=False)
    with celery_app.connection_for_write() as connection:
        Queue(QUEUE).bind(connection.default_channel).declare()
    root = logging.getLogger()
    root_level, root_handlers = root.level, root.handlers[:]
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False):
            yield app, celery_app, intruder
    finally:
        root.setLevel(root_level)
        root.handlers[:] = root_handlers
        intruder.close()
        celery_app.close()


@pytest.fixture
def worker(
    signed: tuple[Flask, TenantCelery, Celery],
) -> t.Iterator[tuple[TenantCelery, Celery]]:
    app, celery_app, intruder = signed
    celery_app.set_current()
    celery_app.set_default()
    RUNS.clear()
    RETRIED.clear()
    with app.app_context():
        yield celery_app, intruder


def publish(intruder: Celery, headers: dict[str, t.Any], task_id: str | None = None,
            name: str = RECORD, label: str = "forged") -> t.Any:
    """A message as anything with broker access could write it: Celery's plain send_task."""
    return intruder.send_task(
        name, (label,), headers=headers, queue=QUEUE, task_id=task_id or str(uuid.uuid4())
    )


def assert_refused(result: t.Any, problem: str) -> TenantSignatureError:
    """The task failed before its body with a ``TenantSignatureError``, not retried."""
    outcome = result.get(timeout=TIMEOUT, propagate=False)
    assert result.state == "FAILURE"
    assert isinstance(outcome, TenantSignatureError), outcome
    assert outcome.problem == problem, outcome
    return outcome


def assert_worker_goes_on() -> None:
    """The next message, sent by the app, runs in its tenant."""
    with tenant_jobs.switch("globex"):
        assert record.delay("next").get(timeout=TIMEOUT) == {"label": "next", "tenant": "globex"}


def app_signed_headers(celery_app: TenantCelery, tenant: str) -> tuple[str, dict[str, t.Any]]:
    """The task id and headers the app gives a message of ``record`` for ``tenant``."""
    options = celery_app.stamp_tenant(RECORD, {"headers": {HEADER: tenant}})
    return options["task_id"], options["headers"]


# -- what the app sends ---------------------------------------------------------------------


def test_a_sent_task_carries_a_signature_and_runs_in_its_tenant(
    worker: tuple[TenantCelery, Celery],
) -> None:
    celery_app, _ = worker
    task_id, headers = app_signed_headers(celery_app, "acme")
    assert headers[SIGNATURE] == Signer((NEW_KEY.encode(),)).sign(RECORD, task_id, "acme")
    assert headers[SIGNATURE].startswith("v1:") and len(headers[SIGNATURE]) == 67
    with tenant_jobs.switch("acme"):
        result = record.delay("sent")
    assert result.get(timeout=TIMEOUT) == {"label": "sent", "tenant": "acme"}
    assert RUNS == [("sent", "acme", 0)]


# -- what an intruder without the key can publish ------------------------------------------


def test_a_message_from_a_plain_celery_app_is_refused_before_its_body(
    worker: tuple[TenantCelery, Celery],
) -> None:
    """No key, a tenant named: refused, not retried (autoretry_for=Exception), and the
    worker serves the next message."""
    _, intruder = worker
    result = publish(intruder, {HEADER: "acme"})
    error = assert_refused(result, "unsigned")
    assert error.tenant == "acme"
    assert "TENANT_JOBS_SIGNING_KEY" in str(error) and "TENANT_JOBS_ACCEPT_UNSIGNED" in str(error)
    assert RUNS == [] and RETRIED == []
    assert_worker_goes_on()


def test_a_signature_copied_from_another_message_is_refused(
    worker: tuple[TenantCelery, Celery],
) -> None:
    """A real signature, moved to another task id, another task, or another tenant."""
    celery_app, intruder = worker
    task_id, headers = app_signed_headers(celery_app, "acme")
    refused = [
        publish(intruder, headers),  # same tenant, another task id
        publish(intruder, headers, task_id=task_id, name="tests.test_signing.other"),
        publish(intruder, {**headers, HEADER: "globex"}, task_id=task_id),  # another tenant
    ]
    for result in refused:
        assert_refused(result, "mismatch")
    assert RUNS == [] and RETRIED == []
    assert_worker_goes_on()


@tenant_task(name="tests.test_signing.other")
def other(label: t.Any = None) -> str | None:
    RUNS.append((label, current_tenant(), 0))
    return current_tenant()


HOSTILE_SIGNATURES: dict[str, t.Any] = {
    "int": 12345,
    "list": ["v1:" + "0" * 64],
    "dict": {"v1": "0" * 64},
    "empty": "",
    "zeros": "v1:" + "0" * 64,
    "truncated": "v1:" + "0" * 20,
    "huge": "v1:" + "a" * 100_000,
    "unicode": "v1:" + "ü" * 64,
    "surrogate": "v1:\ud800" + "0" * 63,
    "another version": "v2:" + "0" * 64,
    "false": False,
}


def test_forged_signatures_of_every_kind_are_refused(
    worker: tuple[TenantCelery, Celery],
) -> None:
    _, intruder = worker
    for kind, value in HOSTILE_SIGNATURES.items():
        result = publish(intruder, {HEADER: "acme", SIGNATURE: value}, label=kind)
        outcome = result.get(timeout=TIMEOUT, propagate=False)
        assert isinstance(outcome, TenantSignatureError), (kind, outcome)
        assert outcome.problem in ("malformed", "mismatch"), (kind, outcome)
        assert len(str(outcome)) < 1000, kind  # a huge header is not echoed back
    assert RUNS == [] and RETRIED == []
    assert_worker_goes_on()


def test_hostile_tenant_values_with_a_signature_are_refused(
    worker: tuple[TenantCelery, Celery],
) -> None:
    """A tenant that is not a string cannot have been signed, whatever signature is next
    to it; a huge one is refused unread."""
    celery_app, intruder = worker
    task_id, headers = app_signed_headers(celery_app, "acme")
    for tenant in (5, ["acme"], {"name": "acme"}, "acme" * 10_000, "äcme", True):
        result = publish(intruder, {HEADER: tenant, SIGNATURE: headers[SIGNATURE]}, task_id)
        outcome = result.get(timeout=TIMEOUT, propagate=False)
        assert isinstance(outcome, TenantSignatureError), (tenant, outcome)
        assert outcome.problem == "mismatch"
        assert len(str(outcome)) < 1000
    assert RUNS == []
    assert_worker_goes_on()


def test_nested_headers_are_checked_like_top_level_ones(
    worker: tuple[TenantCelery, Celery],
) -> None:
    """sentry-sdk nests a ``headers`` dict: a signed tenant there runs, a forged one does not."""
    celery_app, intruder = worker
    task_id, headers = app_signed_headers(celery_app, "acme")
    ran = publish(intruder, {"headers": headers}, task_id=task_id, label="nested")
    assert ran.get(timeout=TIMEOUT)["tenant"] == "acme"
    forged = publish(intruder, {"headers": {HEADER: "globex"}}, label="nested-forged")
    assert_refused(forged, "unsigned")
    mixed_id, acme_headers = app_signed_headers(celery_app, "acme")
    mixed = publish(  # the signature nested, another tenant at the top: the pair must match
        intruder, {HEADER: "globex", "headers": acme_headers}, task_id=mixed_id, label="mixed"
    )
    assert_refused(mixed, "mismatch")
    assert [run[0] for run in RUNS] == ["nested"]


def test_a_wrapper_message_cannot_take_its_tenant_from_the_body(
    worker: tuple[TenantCelery, Celery],
) -> None:
    """``celery.map`` of a tenant task whose signature (in the body) names a tenant, with
    no signed header: refused, also when the body claims the run is eager."""
    _, intruder = worker
    with tenant_jobs.switch("acme"):
        body = {"task": dict(record.s()), "it": ["mapped"]}
    plain = intruder.send_task("celery.map", (), body, queue=QUEUE)
    assert_refused(plain, "unsigned")
    message = intruder.amqp.as_task_v2(str(uuid.uuid4()), "celery.map", (), body)
    args, kwargs, embed = message.body
    forged = message._replace(body=(args, kwargs, {**embed, "is_eager": True}))
    with intruder.producer_or_acquire() as producer:
        intruder.amqp.send_task_message(producer, "celery.map", forged, queue=QUEUE)
    eager_claim = intruder.AsyncResult(message.headers["id"])
    assert_refused(eager_claim, "unsigned")
    assert RUNS == []
    with tenant_jobs.switch("acme"):
        sent = record.map(["mapped-by-the-app"]).apply_async()
    assert sent.get(timeout=TIMEOUT) == [{"label": "mapped-by-the-app", "tenant": "acme"}]


# -- rotation ----------------------------------------------------------------------------


def test_a_message_signed_with_the_old_key_still_runs(
    worker: tuple[TenantCelery, Celery],
) -> None:
    """Rotation: ``[new, old]``: the app signs with the new key, the worker takes both."""
    _, intruder = worker
    task_id = str(uuid.uuid4())
    old = Signer((OLD_KEY,)).sign(RECORD, task_id, "globex")
    ran = publish(intruder, {HEADER: "globex", SIGNATURE: old}, task_id=task_id, label="old")
    assert ran.get(timeout=TIMEOUT) == {"label": "old", "tenant": "globex"}
    retired_id = str(uuid.uuid4())
    retired = Signer((RETIRED_KEY.encode(),)).sign(RECORD, retired_id, "globex")
    refused = publish(intruder, {HEADER: "globex", SIGNATURE: retired}, task_id=retired_id)
    assert_refused(refused, "mismatch")
    assert [run[0] for run in RUNS] == ["old"]


# -- eager runs, the rollout grace, settings -------------------------------------------------


@pytest.fixture
def eager_app(tmp_path: Path) -> t.Iterator[Flask]:
    app = make_app(tmp_path, TENANT_JOBS_SIGNING_KEY=NEW_KEY)
    app.extensions["celery"].conf.task_always_eager = True
    with app.app_context():
        RUNS.clear()
        yield app


def test_eager_runs_check_the_signature_like_a_worker(eager_app: Flask) -> None:
    """``apply()`` and eager ``delay()`` sign; a run of an unsigned request (Celery's own
    ``Task.apply``, as a worker would run a message) is refused before the body."""
    task = eager_app.extensions["celery"].tasks[RECORD]
    with tenant_jobs.switch("acme"):
        assert task.apply(("applied",)).get() == {"label": "applied", "tenant": "acme"}
        assert task.delay("eager").get() == {"label": "eager", "tenant": "acme"}
        assert task.apply(("pinned",), headers={HEADER: "globex"}).get()["tenant"] == "globex"
    unsigned = Task.apply(task, ("unsigned",), headers={HEADER: "acme"})
    assert isinstance(unsigned.result, TenantSignatureError)
    forged = Task.apply(task, ("forged",), headers={HEADER: "acme", SIGNATURE: "v1:" + "0" * 64})
    assert isinstance(forged.result, TenantSignatureError)
    assert [run[0] for run in RUNS] == ["applied", "eager", "pinned"]


def test_the_rollout_grace_runs_unsigned_messages_but_not_forged_ones(tmp_path: Path) -> None:
    app = make_app(tmp_path, TENANT_JOBS_SIGNING_KEY=NEW_KEY, TENANT_JOBS_ACCEPT_UNSIGNED=True)
    task = app.extensions["celery"].tasks[RECORD]
    with app.app_context():
        RUNS.clear()
        queued_before = Task.apply(task, ("queued-before",), headers={HEADER: "acme"})
        assert queued_before.get() == {"label": "queued-before", "tenant": "acme"}
        forged = Task.apply(task, ("forged",), headers={HEADER: "acme", SIGNATURE: "v1:00"})
        assert isinstance(forged.result, TenantSignatureError)
        with tenant_jobs.switch("globex"):
            options = app.extensions["celery"].stamp_tenant(RECORD, {})
        assert SIGNATURE in options["headers"]  # new messages are signed
    assert [run[0] for run in RUNS] == ["queued-before"]


BAD_KEYS: dict[str, t.Any] = {
    "short": "too-short",
    "empty list": [],
    "int": 1234567890123456789,
    "a short key in the list": [NEW_KEY, "short"],
    "a dict": {"key": NEW_KEY},
}


@pytest.mark.parametrize("value", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_a_bad_signing_key_is_refused_without_echoing_it(tmp_path: Path, value: t.Any) -> None:
    with pytest.raises(ConfigurationError, match="'TENANT_JOBS_SIGNING_KEY'") as refused:
        make_app(tmp_path, TENANT_JOBS_SIGNING_KEY=value)
    assert "at least 16 bytes" in str(refused.value)
    assert "too-short" not in str(refused.value) and NEW_KEY not in str(refused.value)


def test_the_grace_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'TENANT_JOBS_SIGNING_KEY' is not set"):
        make_app(tmp_path, TENANT_JOBS_ACCEPT_UNSIGNED=True)


def test_the_key_is_not_in_the_settings_repr(tmp_path: Path) -> None:
    app = make_app(tmp_path, TENANT_JOBS_SIGNING_KEY=NEW_KEY)
    with app.app_context():
        settings = tenant_jobs.settings
    assert settings.signing_key == (NEW_KEY.encode(),)
    assert NEW_KEY not in repr(settings) and "signing_key" not in repr(settings)


def test_the_error_comes_back_whole_from_pickling() -> None:
    error = TenantSignatureError("t", "id-1", {"not": "a name"}, "mismatch")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.problem == "mismatch" and again.tenant == error.tenant


def test_the_pytest_plugin_performs_signed_tasks(eager_app: Flask) -> None:
    """``enqueued_tasks.perform()`` runs a recorded task as a worker would: signature checked."""
    from flask_tenant_jobs.pytest_plugin import EnqueuedTasks

    celery_app = eager_app.extensions["celery"]
    captured = EnqueuedTasks(celery_app)
    with tenant_jobs.switch("acme"):
        options = celery_app.stamp_tenant(RECORD, {})
    captured.record(RECORD, ("forged",), {}, {"headers": {HEADER: "acme"}})
    with pytest.raises(TenantSignatureError):
        captured.perform()
    captured.record(RECORD, ("captured",), {}, options)
    assert captured.perform() == [{"label": "captured", "tenant": "acme"}]
    assert [run[0] for run in RUNS] == ["captured"]
