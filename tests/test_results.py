"""Results belong to their tenant: ``TenantTask.AsyncResult(task_id)`` against a real worker.

A Redis broker and in-process worker (solo pool), with the results on Redis
(database ``TEST_RESULTS_REDIS_DB``, default 7, flushed) and on Celery's SQLAlchemy
database backend on the tests' PostgreSQL (tables of its own, dropped afterwards).
"""

from __future__ import annotations

import logging
import os
import typing as t
import uuid
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import shared_task
from celery.contrib.testing.worker import start_worker
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from kombu import Queue

from flask_tenant_jobs import (
    NoTenantError,
    TenantJobs,
    TenantMismatchError,
    current_tenant,
    tenant_task,
)
from flask_tenant_jobs.results import RESULT_TENANT, TenantAsyncResult
from flask_tenant_jobs.sending import TenantCelery

from .worker_processes import redis_db_url

pytestmark = [
    pytest.mark.redis,
    pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning"),
]

REDIS_DB = int(os.environ.get("TEST_RESULTS_REDIS_DB", "7"))
QUEUE = f"ftj-results-{uuid.uuid4().hex[:8]}"
TABLES = {"task": "ftj_results_task", "group": "ftj_results_group"}
TIMEOUT = 20.0

db = SQLAlchemy()
tenant_jobs = TenantJobs()


@tenant_task(name="tests.test_results.job")
def job(label: str) -> dict[str, t.Any]:
    return {"label": label, "tenant": current_tenant()}


@tenant_task(name="tests.test_results.boom")
def boom(label: str) -> None:
    raise ValueError(f"acme's secret {label}")


@tenant_task(name="tests.test_results.retry_once", bind=True, max_retries=1)
def retry_once(self: t.Any, label: str) -> dict[str, t.Any]:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return {"label": label, "tenant": current_tenant(), "retries": self.request.retries}


@shared_task(name="tests.test_results.plain_job")
def plain_job() -> str:
    return "plain"


Setup = tuple[Flask, TenantCelery]


@pytest.fixture(scope="module", params=["redis", "database"])
def results(
    request: pytest.FixtureRequest, redis_url: str, postgres_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> t.Iterator[Setup]:
    url = redis_db_url(redis_url, REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    celery: dict[str, t.Any] = {
        "broker_url": url,
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
        "worker_enable_remote_control": False,
    }
    if request.param == "redis":
        celery["result_backend"] = url
    else:
        celery["result_backend"] = "db+" + postgres_url
        celery["database_table_names"] = TABLES
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path_factory.mktemp('results') / 'r.db'}",
        TENANT_JOBS_TENANTS=["acme", "globex"],
        CELERY=celery,
    )
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)

    @app.get("/jobs/<task_id>")
    def job_page(task_id: str) -> dict[str, t.Any]:
        result = job.AsyncResult(task_id)
        return {"state": result.state, "result": result.result if result.ready() else None}

    celery_app: TenantCelery = app.extensions["celery"]
    with celery_app.connection_for_write() as connection:
        Queue(QUEUE).bind(connection.default_channel).declare()
    root = logging.getLogger()
    root_level, root_handlers = root.level, root.handlers[:]
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False):
            yield app, celery_app
    finally:
        root.setLevel(root_level)
        root.handlers[:] = root_handlers
        celery_app.close()
        if request.param == "database":
            engine = sa.create_engine(postgres_url)
            with engine.begin() as connection:
                for table in TABLES.values():
                    connection.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
            engine.dispose()


@pytest.fixture
def setup(results: Setup) -> t.Iterator[Setup]:
    app, celery_app = results
    celery_app.set_current()
    celery_app.set_default()
    with app.app_context():
        yield results


def ran_in(tenant: str, task: t.Any, *args: t.Any) -> str:
    """Send ``task`` in ``tenant``, wait for it to finish there, return its id."""
    with tenant_jobs.switch(tenant):
        sent = task.delay(*args)
    sent.get(timeout=TIMEOUT, propagate=False)
    return str(sent.id)


#: Every way of reading a result, and what each returns or does.
READS: dict[str, t.Callable[[t.Any], t.Any]] = {
    "state": lambda r: r.state,
    "status": lambda r: r.status,
    "result": lambda r: r.result,
    "info": lambda r: r.info,
    "traceback": lambda r: r.traceback,
    "get": lambda r: r.get(timeout=TIMEOUT),
    "get without propagate": lambda r: r.get(timeout=TIMEOUT, propagate=False),
    "ready": lambda r: r.ready(),
    "successful": lambda r: r.successful(),
    "failed": lambda r: r.failed(),
    "children": lambda r: r.children,
    "date_done": lambda r: r.date_done,
    "maybe_throw": lambda r: r.maybe_throw(),
    "exists": lambda r: r.exists(),
}


def test_a_result_reads_in_its_own_tenant(setup: Setup) -> None:
    task_id = ran_in("acme", job, "mine")
    with tenant_jobs.switch("acme"):
        result = job.AsyncResult(task_id)
        assert isinstance(result, TenantAsyncResult)
        assert result.state == "SUCCESS" and result.successful() and result.ready()
        assert result.get(timeout=TIMEOUT) == {"label": "mine", "tenant": "acme"}
        assert result.info == result.result == {"label": "mine", "tenant": "acme"}
        assert result.date_done is not None


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
def test_every_read_of_another_tenants_result_is_refused(
    setup: Setup, read: t.Callable[[t.Any], t.Any]
) -> None:
    task_id = ran_in("acme", boom, "x")  # a failure: its error must not leak either
    with tenant_jobs.switch("globex"), pytest.raises(TenantMismatchError) as refused:
        read(job.AsyncResult(task_id))
    assert refused.value.tenant == "acme" and refused.value.current == "globex"


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
def test_every_read_with_no_tenant_is_refused(
    setup: Setup, read: t.Callable[[t.Any], t.Any]
) -> None:
    task_id = ran_in("acme", job, "x")
    with pytest.raises(NoTenantError):
        read(job.AsyncResult(task_id))


def test_forget_and_revoke_of_another_tenants_task_are_refused(setup: Setup) -> None:
    _, celery_app = setup
    task_id = ran_in("acme", job, "keep")
    with tenant_jobs.switch("globex"):
        with pytest.raises(TenantMismatchError):
            job.AsyncResult(task_id).forget()
        with pytest.raises(TenantMismatchError):
            job.AsyncResult(task_id).revoke()
    assert celery_app.AsyncResult(task_id).state == "SUCCESS"  # still there
    with tenant_jobs.switch("acme"):
        job.AsyncResult(task_id).forget()
        assert job.AsyncResult(task_id).state == "PENDING"


def test_a_result_not_stored_yet_reads_as_pending(setup: Setup) -> None:
    unknown = str(uuid.uuid4())
    with tenant_jobs.switch("globex"):
        result = job.AsyncResult(unknown)
        assert result.state == "PENDING" and not result.ready() and result.result is None
        with pytest.raises(TenantMismatchError, match="no result of it is stored yet"):
            result.revoke()  # a queued task cannot be shown to be this tenant's
    with pytest.raises(NoTenantError):
        job.AsyncResult(unknown).state  # noqa: B018


def test_failures_and_retries_store_the_tenant(setup: Setup) -> None:
    _, celery_app = setup
    failed = ran_in("acme", boom, "f")
    retried = ran_in("globex", retry_once, "r")
    assert celery_app.backend.get_task_meta(failed)[RESULT_TENANT] == "acme"
    assert celery_app.backend.get_task_meta(retried)[RESULT_TENANT] == "globex"
    with tenant_jobs.switch("acme"):
        outcome = job.AsyncResult(failed)
        assert outcome.failed() and isinstance(outcome.result, ValueError)
        with pytest.raises(ValueError, match="acme's secret"):
            outcome.get(timeout=TIMEOUT)
    with tenant_jobs.switch("globex"):
        assert job.AsyncResult(retried).get(timeout=TIMEOUT)["retries"] == 1


def test_a_plain_tasks_result_has_no_tenant_and_is_refused(setup: Setup) -> None:
    with tenant_jobs.switch("acme"):
        sent = plain_job.delay()
    assert sent.get(timeout=TIMEOUT) == "plain"
    with tenant_jobs.switch("acme"), pytest.raises(TenantMismatchError):
        job.AsyncResult(sent.id).state  # noqa: B018


def test_the_unguarded_handles(setup: Setup) -> None:
    """What ``delay()`` returns is the sender's; ``celery_app.AsyncResult`` is Celery's; and
    ``without_tenant()`` reads any result deliberately."""
    _, celery_app = setup
    with tenant_jobs.switch("acme"):
        sent = job.delay("handle")
    assert not isinstance(sent, TenantAsyncResult)
    assert sent.get(timeout=TIMEOUT)["tenant"] == "acme"  # read outside the tenant
    assert celery_app.AsyncResult(sent.id).state == "SUCCESS"
    with tenant_jobs.without_tenant():
        assert job.AsyncResult(sent.id).result["label"] == "handle"


def test_a_job_page_answers_404_for_another_tenants_job(setup: Setup) -> None:
    app, _ = setup
    task_id = ran_in("acme", job, "page")
    client = app.test_client()
    mine = client.get(f"/jobs/{task_id}", base_url="http://acme.example.test/")
    assert mine.status_code == 200
    assert mine.json == {"state": "SUCCESS", "result": {"label": "page", "tenant": "acme"}}
    theirs = client.get(f"/jobs/{task_id}", base_url="http://globex.example.test/")
    assert theirs.status_code == 404
    assert "acme" not in theirs.get_data(as_text=True)
    apex = client.get(f"/jobs/{task_id}", base_url="http://example.test/")
    assert apex.status_code == 404


def test_eager_results_are_stored_with_the_tenant(tmp_path: Path, redis_url: str) -> None:
    url = redis_db_url(redis_url, REDIS_DB)
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'e.db'}",
        TENANT_JOBS_TENANTS=["acme", "globex"],
        CELERY={"broker_url": "memory://", "result_backend": url,
                "task_always_eager": True, "task_store_eager_result": True},
    )
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    task = app.extensions["celery"].tasks["tests.test_results.job"]
    with app.app_context():
        with tenant_jobs.switch("acme"):
            task_id = task.delay("eager").id
            assert task.AsyncResult(task_id).result["tenant"] == "acme"
        with tenant_jobs.switch("globex"), pytest.raises(TenantMismatchError):
            task.AsyncResult(task_id).state  # noqa: B018
