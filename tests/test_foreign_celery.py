"""Tenant tasks on a Celery app that ``TenantJobs`` did not make: Flask's own pattern.

Flask's documentation builds its Celery app with ``celery_init_app(app)`` (a
``FlaskTask`` base that pushes an app context, ``set_default()``, and
``app.extensions["celery"]``). ``@tenant_task`` tasks are shared tasks, so they bind
to that app too: a real Redis worker running it, and eager mode, must restore the
tenant its messages name, in the Flask app the Celery app belongs to. This app turns
``TENANT_JOBS_REQUIRE_TENANT`` off, so a body run with no tenant would read every
tenant's rows: it must be refused instead.
"""

from __future__ import annotations

import logging
import os
import typing as t
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery, Task
from celery.contrib.testing.worker import start_worker
from flask import Flask, has_app_context
from flask_sqlalchemy import SQLAlchemy
from kombu import Queue

from flask_tenant_jobs import (
    ConfigurationError,
    NoTenantError,
    TenantJobs,
    TenantScoped,
    current_tenant,
    tenant_task,
)
from flask_tenant_jobs.sending import find_flask_app, header_name

pytestmark = [
    pytest.mark.redis,
    # celery's Redis result backend calls redis-py's deprecated setex
    pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning"),
]

db = SQLAlchemy()
tenant_jobs = TenantJobs()
QUEUE = f"ftj-foreign-{uuid.uuid4().hex[:8]}"
REDIS_DB = int(os.environ.get("TEST_FOREIGN_REDIS_DB", "10"))
HEADER = "x_tenant"  # not the default: a foreign app must use the configured header
TIMEOUT = 20.0


class Note(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "foreign_note"
    id = db.Column(db.Integer, primary_key=True)


@tenant_task(name="tests.test_foreign_celery.read_notes")
def read_notes(label: t.Any = None) -> dict[str, t.Any]:
    """What the task saw: its tenant, whether an app context is pushed, the rows it reads."""
    visible = sorted({note.tenant_id for note in Note.query.all()})
    return {"tenant": current_tenant(), "app_context": has_app_context(), "visible": visible}


def celery_init_app(app: Flask) -> Celery:
    """Flask's documented Celery pattern, verbatim in substance."""

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def _redis_db(url: str, number: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{number}", parts.query, parts.fragment))


@pytest.fixture(scope="module")
def foreign(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Celery]:
    """The Flask app, its foreign Celery app and a real worker (Redis) running it."""
    url = _redis_db(redis_url, REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path_factory.mktemp('foreign') / 'f.db'}",
        TENANT_JOBS_TENANTS=["acme", "globex"],
        TENANT_JOBS_REQUIRE_TENANT=False,
        TENANT_JOBS_HEADER=HEADER,
        CELERY={
            "broker_url": url,
            "result_backend": url,
            "task_default_queue": QUEUE,
            "worker_hijack_root_logger": False,
            "worker_enable_remote_control": False,
        },
    )
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    celery_app = celery_init_app(app)
    with app.app_context():
        db.create_all()
        for tenant in ("acme", "globex"):
            with tenant_jobs.switch(tenant):
                db.session.add(Note())
                db.session.commit()
    with celery_app.connection_for_write() as connection:
        Queue(QUEUE).bind(connection.default_channel).declare()
    root = logging.getLogger()
    root_level, root_handlers = root.level, root.handlers[:]
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False):
            yield celery_app
    finally:
        root.setLevel(root_level)
        root.handlers[:] = root_handlers
        celery_app.close()


@pytest.fixture
def flask_app(foreign: Celery) -> t.Iterator[Flask]:
    foreign.set_current()
    foreign.set_default()
    app = t.cast(Flask, find_flask_app(foreign))
    with app.app_context():
        yield app


def test_the_foreign_app_belongs_to_its_flask_app(foreign: Celery, flask_app: Flask) -> None:
    assert not hasattr(foreign, "flask_app")
    assert find_flask_app(foreign) is flask_app
    assert header_name(foreign) == HEADER


def test_a_worker_restores_the_tenant_and_app_context(foreign: Celery, flask_app: Flask) -> None:
    """Regression: the worker restored nothing; the body ran with no tenant, and with
    ``REQUIRE_TENANT`` off read every tenant's rows."""
    with tenant_jobs.switch("acme"):
        result = read_notes.delay("acme")
    assert result.get(timeout=TIMEOUT) == {
        "tenant": "acme", "app_context": True, "visible": ["acme"]
    }


def test_eager_runs_in_the_tenant_its_header_names(foreign: Celery, flask_app: Flask) -> None:
    """Regression: eager mode ran the body in the caller's tenant, not the header's."""
    foreign.conf.task_always_eager = True
    try:
        with tenant_jobs.switch("acme"):
            result = read_notes.apply_async(("x",), headers={HEADER: "globex"})
            assert current_tenant() == "acme"
    finally:
        foreign.conf.task_always_eager = False
    assert result.get() == {"tenant": "globex", "app_context": True, "visible": ["globex"]}


def test_map_built_in_a_tenant_runs_there(foreign: Celery, flask_app: Flask) -> None:
    with tenant_jobs.switch("globex"):
        mapped = read_notes.map(["a", "b"])
    assert mapped.apply_async().get(timeout=TIMEOUT) == [
        {"tenant": "globex", "app_context": True, "visible": ["globex"]}
    ] * 2


def test_map_with_no_tenant_is_refused_and_reads_nothing(
    foreign: Celery, flask_app: Flask
) -> None:
    """A foreign app cannot stamp the wrapper message: the worker refuses the body."""
    outcome = read_notes.map(["a"]).apply_async().get(timeout=TIMEOUT, propagate=False)
    assert isinstance(outcome, NoTenantError)


def test_sending_with_no_tenant_names_the_configured_header(
    foreign: Celery, flask_app: Flask
) -> None:
    """Regression: the hint always said headers={'tenant_for_job': name}."""
    with pytest.raises(NoTenantError) as refused:
        read_notes.delay("x")
    assert f"headers={{{HEADER!r}: name}}" in str(refused.value)
    assert "tenant_for_job" not in str(refused.value)


def test_a_tenant_task_called_directly_with_no_tenant_is_refused(flask_app: Flask) -> None:
    with pytest.raises(NoTenantError):
        read_notes("direct")


def test_an_ambiguous_celery_app_is_refused_by_the_worker(tmp_path: Path) -> None:
    """Two TenantJobs apps and a Celery app tied to neither: no app to restore in."""
    stray = Celery("stray", broker="memory://", set_as_current=False)
    other = Flask("other")
    other.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'o.db'}",
        TENANT_JOBS_TENANTS=["acme"],
    )
    TenantJobs(other, db=SQLAlchemy(other))
    assert find_flask_app(stray) is None
    task = stray.tasks["tests.test_foreign_celery.read_notes"]
    headers = {"tenant_for_job": "acme"}
    with pytest.raises(ConfigurationError, match="not tied to a Flask app"):
        task.apply(("x",), headers=headers)  # refused where it is sent
    outcome = Task.apply(task, ("x",), headers=headers)  # as a worker would run it
    assert outcome.failed()
    assert isinstance(outcome.result, ConfigurationError)
    assert "belongs to no single Flask app" in str(outcome.result)
