"""The app the Celery tests run: tenant tasks that report what tenant they saw.

Importable by worker subprocesses (``flask --app tests.jobs_app tenant-jobs worker``),
so everything is configured from environment variables:

* ``TEST_JOBS_BROKER_URL`` (default: the in-memory broker), ``TEST_JOBS_BACKEND_URL``
  (default: ``cache+memory://``), ``TEST_JOBS_DATABASE_URL`` (default: SQLite file),
  ``TEST_JOBS_EAGER=1`` for ``task_always_eager``.

Each task returns an observation dict ``{"task", "tenant", "header", "label"}``
and, where it touches the database, writes a ``Seen`` row (tenant-scoped) so
cross-tenant writes and reads can be counted afterwards.
"""

from __future__ import annotations

import os
import typing as t
from contextlib import ExitStack

from celery import Task, shared_task
from celery.exceptions import Ignore, Reject
from flask import Flask, has_app_context
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs, TenantScoped, TenantTask, current_tenant, tenant_task
from flask_tenant_jobs.context import is_unscoped

from .data import tenant_table

db = SQLAlchemy()
tenant_jobs = TenantJobs()
TENANTS = ["acme", "globex", "initech"]

#: Failure/retry/success handler observations (in-process workers only).
HANDLER_CALLS: list[tuple[str, str | None]] = []
#: (handler, tenant, has app context) of the handlers around a task whose on_failure raises.
RAISING_HANDLER_CALLS: list[tuple[str, str | None, bool]] = []
#: ``without_tenant()`` blocks deliberately left open by ``leak_unscoped`` (never closed).
LEFT_OPEN: list[ExitStack] = []


class Seen(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """A row a task wrote in its tenant, recording the tenant it believed it had."""

    id = db.Column(db.Integer, primary_key=True)
    label = db.Column(db.String(80), nullable=False)
    believed = db.Column(db.String(63))


def observe(task: Task, label: t.Any = None) -> dict[str, t.Any]:
    """What a running task sees: its name, current tenant, request header and label."""
    return {
        "task": task.name.rsplit(".", 1)[-1],
        "tenant": current_tenant(),
        "header": getattr(task.request, "tenant_for_job", None),
        "label": label,
    }


class RecordingTask(TenantTask):
    """A TenantTask subclass whose handlers record the tenant they ran in."""

    def on_success(self, retval: t.Any, task_id: str, args: t.Any, kwargs: t.Any) -> None:
        HANDLER_CALLS.append(("on_success", current_tenant()))

    def on_failure(
        self, exc: BaseException, task_id: str, args: t.Any, kwargs: t.Any, einfo: t.Any
    ) -> None:
        HANDLER_CALLS.append(("on_failure", current_tenant()))

    def on_retry(
        self, exc: BaseException, task_id: str, args: t.Any, kwargs: t.Any, einfo: t.Any
    ) -> None:
        HANDLER_CALLS.append(("on_retry", current_tenant()))


class RaisingFailureHandlerTask(TenantTask):
    """A TenantTask whose on_failure records where it ran, then raises (every time)."""

    def on_failure(
        self, exc: BaseException, task_id: str, args: t.Any, kwargs: t.Any, einfo: t.Any
    ) -> None:
        RAISING_HANDLER_CALLS.append(("on_failure", current_tenant(), has_app_context()))
        raise RuntimeError("on_failure raised")


class RaisingRetryHandlerTask(TenantTask):
    """A TenantTask whose on_retry raises, so Celery's failure handlers run after postrun."""

    def on_retry(
        self, exc: BaseException, task_id: str, args: t.Any, kwargs: t.Any, einfo: t.Any
    ) -> None:
        RAISING_HANDLER_CALLS.append(("on_retry", current_tenant(), has_app_context()))
        raise RuntimeError("on_retry raised")

    def on_failure(
        self, exc: BaseException, task_id: str, args: t.Any, kwargs: t.Any, einfo: t.Any
    ) -> None:
        RAISING_HANDLER_CALLS.append(("on_failure", current_tenant(), has_app_context()))


@tenant_task(bind=True)
def observe_task(self: Task, label: t.Any = None) -> dict[str, t.Any]:
    """Report the tenant; chains pass the previous observation in as ``label``."""
    return observe(self, label)


@tenant_task(bind=True)
def observe_around_a_nested_run(self: Task, other_tenant: str) -> dict[str, t.Any]:
    """Run ``observe_task`` in place in ``other_tenant`` (``apply()``: a run inside this
    run) and call it directly, then observe again: what this task sees before and after."""
    before = observe(self, "before")
    nested = observe_task.apply(("nested",), headers={"tenant_for_job": other_tenant}).result
    called = observe_task("called")
    return {"before": before, "nested": nested, "called": called,
            "after": observe(self, "after"), "app_context": has_app_context()}


@tenant_task(bind=True)
def write_seen(self: Task, label: str) -> dict[str, t.Any]:
    """Write a row in the task's tenant and report every tenant_id it can read back."""
    db.session.add(Seen(label=label, believed=current_tenant()))
    db.session.commit()
    visible = sorted({row.tenant_id for row in Seen.query.all()})
    return {**observe(self, label), "visible": visible}


@tenant_task(bind=True, base=RecordingTask, max_retries=2, default_retry_delay=0)
def retry_then_observe(self: Task, label: t.Any = None) -> dict[str, t.Any]:
    """Retry twice (recording the tenant each time), then report."""
    if self.request.retries < 2:
        raise self.retry(countdown=0)
    return {**observe(self, label), "retries": self.request.retries}


@tenant_task(bind=True, autoretry_for=(ValueError,), max_retries=1, default_retry_delay=0)
def autoretry_observe(self: Task, label: t.Any = None) -> dict[str, t.Any]:
    """Fail once with ValueError (autoretried), then report."""
    if self.request.retries < 1:
        raise ValueError("first attempt fails")
    return observe(self, label)


@tenant_task(bind=True, base=RecordingTask)
def fail(self: Task, label: t.Any = None) -> None:
    """Always fail, so that on_failure and errbacks run."""
    raise RuntimeError(f"failing in {current_tenant()}")


@tenant_task(bind=True)
def reject(self: Task, label: t.Any = None) -> None:
    """Reject the message without requeue."""
    raise Reject("rejected on purpose", requeue=False)


@tenant_task(bind=True)
def ignore(self: Task, label: t.Any = None) -> None:
    """Ignore the task."""
    raise Ignore()


@tenant_task(bind=True)
def errback_observe(self: Task, *args: t.Any) -> dict[str, t.Any]:
    """A link_error target: reports the tenant the errback runs in."""
    return observe(self, "errback")


@tenant_task(bind=True)
def spawn_child(self: Task, label: t.Any = None) -> str:
    """Enqueue ``observe_task`` from inside a task; return the child's id."""
    return str(observe_task.delay(label).id)


@tenant_task(bind=True)
def replace_with_observe(self: Task, label: t.Any = None) -> t.Any:
    """Replace itself with ``observe_task``."""
    return self.replace(observe_task.s(label))


@tenant_task(bind=True, base=RaisingFailureHandlerTask)
def fail_with_raising_handler(self: Task, label: t.Any = None) -> None:
    """Fail, so that the raising on_failure (and the errbacks) run."""
    raise ValueError(f"failing in {current_tenant()}")


@tenant_task(bind=True, base=RaisingRetryHandlerTask, max_retries=3, default_retry_delay=0)
def retry_with_raising_handler(self: Task, label: t.Any = None) -> str | None:
    """Ask for one retry, so that the raising on_retry runs; the retried run succeeds."""
    if not self.request.retries:
        raise self.retry(countdown=0)
    return current_tenant()


@tenant_task(bind=True)
def replace_with_map(self: Task, label: t.Any = None) -> t.Any:
    """Replace itself with a map of ``observe_task``."""
    return self.replace(observe_task.map([label, label]))


@tenant_task
def collect_tenants(results: list[t.Any]) -> list[t.Any]:
    """A chord body: the tenants of the header's observations (lists for maps), then its own."""
    seen = [[o["tenant"] for o in r] if isinstance(r, list) else r["tenant"] for r in results]
    return [*seen, current_tenant()]


@tenant_task(bind=True)
def record_errback(self: Task, *args: t.Any) -> None:
    """A link_error target recording the tenant and app context it ran with."""
    RAISING_HANDLER_CALLS.append(("errback", current_tenant(), has_app_context()))


@tenant_task
def record_link(result: t.Any) -> str:
    """A link (or link_error) target: write a row labelled after the parent's label (or,
    as an errback, the failed task's id), in this task's tenant."""
    label = f"link:{result['label'] if isinstance(result, dict) else result}"
    db.session.add(Seen(label=label, believed=current_tenant()))
    db.session.commit()
    return label


@tenant_task(bind=True)
def leak_unscoped(self: Task, label: t.Any = None) -> bool:
    """Enter ``without_tenant()`` and never leave it (an ExitStack left open)."""
    stack = ExitStack()
    stack.enter_context(tenant_jobs.without_tenant())
    LEFT_OPEN.append(stack)
    return is_unscoped()


@tenant_task
def scoping_of_task(label: t.Any = None) -> dict[str, t.Any]:
    """Whether scoping is on, and which rows of ``Seen`` this task can read."""
    visible = sorted({row.tenant_id for row in Seen.query.all()})
    return {"tenant": current_tenant(), "unscoped": is_unscoped(), "visible": visible}


@shared_task
def plain_scoping() -> bool:
    """A plain task: whether it runs with the unscoped flag set."""
    return is_unscoped()


@shared_task(bind=True)
def plain_observe(self: Task, label: t.Any = None) -> dict[str, t.Any]:
    """A plain (cross-tenant) task: it must run with no tenant."""
    return observe(self, label)


@shared_task
def each_tenant_maintenance() -> list[str]:
    """A cross-tenant task visiting every tenant with ``each()``."""
    return [current_tenant() or "-" for _ in tenant_jobs.each()]


def create_app(**overrides: t.Any) -> Flask:
    """The test app; ``overrides`` update ``app.config`` (``CELERY`` merges)."""
    app = Flask(__name__)
    celery_config = {
        "broker_url": os.environ.get("TEST_JOBS_BROKER_URL", "memory://"),
        "result_backend": os.environ.get("TEST_JOBS_BACKEND_URL", "cache+memory://"),
        "task_always_eager": os.environ.get("TEST_JOBS_EAGER") == "1",
        "task_store_eager_result": True,
        "broker_connection_retry_on_startup": True,
    }
    celery_config.update(overrides.pop("CELERY", {}))
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=os.environ.get(
            "TEST_JOBS_DATABASE_URL", f"sqlite:///{os.path.abspath('jobs_app.sqlite3')}"
        ),
        TENANT_JOBS_TENANTS=TENANTS,
        CELERY=celery_config,
    )
    app.config.update(overrides)
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app


# -- Variants for the subprocess worker tests (tests/test_workers.py) --------------------
#
# ``create_variant_app()`` is ``create_app()`` plus switches read from the environment,
# so that ``flask --app "tests.jobs_app:create_variant_app()" ...`` subprocesses can run:
#
# * ``TEST_JOBS_TENANTS_FROM_TABLE=1``: ``TENANT_JOBS_TENANTS`` is :func:`tenants_from_table`,
#   which reads the shared ``jobs_tenant`` table and counts its calls in Redis
#   (``INCR jobs:tenant_source_calls`` at ``TEST_JOBS_COUNTER_URL``, when set);
# * ``TEST_JOBS_CACHE_SECONDS``: ``TENANT_JOBS_CACHE_SECONDS``;
# * ``TEST_JOBS_SIGNING_KEY``: ``TENANT_JOBS_SIGNING_KEY`` (tenant headers signed and checked);
# * ``TEST_JOBS_BEAT=1``: a beat schedule running ``write_seen`` every second for every tenant
#   (label ``beat-all``), for ``globex`` only (label ``beat-globex``), pinned to
#   ``initech`` by its headers (``beat-pinned``), and for ``acme`` and ``hooli``, a tenant
#   that does not exist (``beat-subset``);
# * ``TEST_JOBS_WARM_ENGINE=1``: the app opens (and pools) a database connection when it is
#   made, and records its server pid in Redis (``jobs:parent_backend_pid``), so that a
#   forked worker child would inherit it unless the engines are disposed after the fork;
# * ``TEST_JOBS_DEFAULT_QUEUE``: Celery's ``task_default_queue`` (so that concurrent test runs
#   sharing a broker do not take each other's tasks);
# * ``TEST_JOBS_NO_CELERY=1``: no ``CELERY`` configuration at all.

SOURCE_CALLS_KEY = "jobs:tenant_source_calls"
PARENT_BACKEND_PID_KEY = "jobs:parent_backend_pid"


#: The app's shared table of tenant names.
Tenant = tenant_table(db, "jobs_tenant")


def _counter_redis() -> t.Any:
    url = os.environ.get("TEST_JOBS_COUNTER_URL")
    if not url:
        return None
    import redis

    return redis.Redis.from_url(url)


def tenants_from_table() -> list[str]:
    """``TENANT_JOBS_TENANTS`` as a callable: the names in ``jobs_tenant`` (calls counted)."""
    counter = _counter_redis()
    if counter is not None:
        counter.incr(SOURCE_CALLS_KEY)
    with db.engine.connect() as connection:
        return list(connection.execute(db.select(Tenant.name)).scalars())


BEAT_SCHEDULE = {
    "write-seen-every-tenant": {
        "task": "tests.jobs_app.write_seen",
        "schedule": 1.0,
        "args": ("beat-all",),
    },
    "write-seen-globex": {
        "task": "tests.jobs_app.write_seen",
        "schedule": 1.0,
        "args": ("beat-globex",),
        "options": {"tenants": ["globex"]},
    },
    "write-seen-pinned": {
        "task": "tests.jobs_app.write_seen",
        "schedule": 1.0,
        "args": ("beat-pinned",),
        "options": {"headers": {"tenant_for_job": "initech"}},
    },
    "write-seen-subset-with-a-tenant-that-left": {
        "task": "tests.jobs_app.write_seen",
        "schedule": 1.0,
        "args": ("beat-subset",),
        "options": {"tenants": ["acme", "hooli"]},
    },
}


@tenant_task(bind=True)
def db_backend(self: Task, label: t.Any = None) -> dict[str, t.Any]:
    """Report the worker process id and the database server pid of the task's connection."""
    import time

    backend_pid = db.session.execute(db.text("SELECT pg_backend_pid()")).scalar()
    time.sleep(0.05)  # let the other pool processes take their share
    return {**observe(self, label), "pid": os.getpid(), "backend_pid": backend_pid}


def create_variant_app() -> Flask:
    """``create_app()`` with the environment switches described above."""
    if os.environ.get("TEST_JOBS_NO_CELERY") == "1":
        app = Flask(__name__)
        app.config.update(
            SERVER_NAME="example.test",
            SQLALCHEMY_DATABASE_URI=os.environ.get(
                "TEST_JOBS_DATABASE_URL", f"sqlite:///{os.path.abspath('jobs_app.sqlite3')}"
            ),
            TENANT_JOBS_TENANTS=TENANTS,
        )
        db.init_app(app)
        tenant_jobs.init_app(app, db=db)
        return app
    overrides: dict[str, t.Any] = {}
    if os.environ.get("TEST_JOBS_TENANTS_FROM_TABLE") == "1":
        overrides["TENANT_JOBS_TENANTS"] = tenants_from_table
    if os.environ.get("TEST_JOBS_CACHE_SECONDS"):
        overrides["TENANT_JOBS_CACHE_SECONDS"] = float(os.environ["TEST_JOBS_CACHE_SECONDS"])
    if os.environ.get("TEST_JOBS_SIGNING_KEY"):
        overrides["TENANT_JOBS_SIGNING_KEY"] = os.environ["TEST_JOBS_SIGNING_KEY"]
    celery_overrides: dict[str, t.Any] = {}
    if os.environ.get("TEST_JOBS_DEFAULT_QUEUE"):
        celery_overrides["task_default_queue"] = os.environ["TEST_JOBS_DEFAULT_QUEUE"]
    if os.environ.get("TEST_JOBS_BEAT") == "1":
        celery_overrides["beat_schedule"] = BEAT_SCHEDULE
    overrides["CELERY"] = celery_overrides
    app = create_app(**overrides)
    if os.environ.get("TEST_JOBS_WARM_ENGINE") == "1":
        with app.app_context():
            backend_pid = db.session.execute(db.text("SELECT pg_backend_pid()")).scalar()
            db.session.remove()  # the connection goes back to the pool, still open
        counter = _counter_redis()
        if counter is not None:
            counter.set(PARENT_BACKEND_PID_KEY, str(backend_pid))
    return app


# -- For the in-process Celery matrix (tests/test_jobs.py) -------------------------------

#: The logger ``log_tenant`` writes to.
TASK_LOGGER = "tests.jobs_app.tasks"


@tenant_task(bind=True)
def log_tenant(self: Task, label: t.Any = None) -> dict[str, t.Any]:
    """Log one record (``TASK_LOGGER``, level WARNING) from inside the task, then report."""
    import logging

    logging.getLogger(TASK_LOGGER).warning("log_tenant %s", label)
    return observe(self, label)


def create_app_without_tenant_jobs() -> Flask:
    """A Flask app that does not use ``TenantJobs`` (for the CLI's error messages)."""
    return Flask("plain")
