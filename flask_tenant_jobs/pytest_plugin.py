"""pytest plugin (registered as ``flask_tenant_jobs``): fixtures for tenant code.

Built on an ``app`` fixture (pytest-flask's convention):

* ``tenant_jobs``: the app's extension;
* ``@pytest.mark.tenant("acme")``: the test runs switched into ``acme``;
* ``enqueued_tasks``: tasks sent during the test are recorded instead of
  published; ``perform()`` runs them (and what they send) in their tenants;
* ``tenant_client(name)``: a test client whose requests go to that tenant;
* after every test the tenant is reset, even if the test never left a switch.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass, field
from uuid import uuid4

import pytest
from celery.app.trace import build_tracer
from celery.utils.functional import maybe_list
from flask import Flask
from flask.testing import FlaskClient

from . import context
from .extension import TenantJobs
from .resolvers import Address
from .sending import header_name
from .state import extension_of

#: How many tasks ``perform()`` runs at most, so that a task re-sending itself ends.
PERFORM_LIMIT = 10_000


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``tenant`` marker."""
    config.addinivalue_line("markers", "tenant(name): run the test switched into tenant NAME")


@pytest.fixture(autouse=True)
def _tenant_jobs_isolation(request: pytest.FixtureRequest) -> t.Iterator[None]:
    """Enter the ``tenant`` marker's tenant; restore the tenant after the test, always."""
    with context.isolated():
        marker = request.node.get_closest_marker("tenant")
        if marker is not None:
            app: Flask = request.getfixturevalue("app")
            with app.app_context():
                tenant = extension_of(app).validate(*marker.args)
            context.enter(tenant)
        yield


@pytest.fixture
def tenant_jobs(app: Flask) -> TenantJobs:
    """The ``TenantJobs`` extension of the ``app`` fixture."""
    return extension_of(app)


@dataclass
class EnqueuedTask:
    """A task sent during a test: what ran it would need."""

    name: str
    args: tuple[t.Any, ...]
    kwargs: dict[str, t.Any]
    tenant: str | None
    options: dict[str, t.Any] = field(repr=False)
    performed: bool = False


class EnqueuedTasks:
    """The tasks sent during a test, in order; ``perform()`` runs them like a worker."""

    def __init__(self, celery_app: t.Any) -> None:
        self._celery = celery_app
        self._header = header_name(celery_app)
        self.records: list[EnqueuedTask] = []

    def __iter__(self) -> t.Iterator[EnqueuedTask]:
        return iter(list(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def record(self, name: str, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]) -> None:
        """Keep a sent task instead of publishing it."""
        headers = options.get("headers") or {}
        self.records.append(
            EnqueuedTask(name, tuple(args or ()), dict(kwargs or {}), headers.get(self._header),
                         options)
        )

    def perform(self) -> list[t.Any]:
        """Run every pending task, and those they send, each in its captured tenant.

        Each runs through Celery's tracer with the request its message would
        give a worker, so the tenant is restored and reset as in a worker, and
        retries, chain steps, callbacks and replacements are sent (and recorded)
        as a worker would send them.
        Returns the results in the order the tasks ran.
        """
        results: list[t.Any] = []
        for _ in range(PERFORM_LIMIT):
            pending = next((r for r in self.records if not r.performed), None)
            if pending is None:
                return results
            pending.performed = True
            results.append(self._run(pending))
        raise RuntimeError(f"perform() stopped after {PERFORM_LIMIT} tasks: do tasks loop?")

    def _run(self, record: EnqueuedTask) -> t.Any:
        """Trace the task as a worker does for its message; failures propagate."""
        task = self._celery.tasks[record.name]
        options = record.options
        task_id = options.get("task_id") or str(uuid4())
        request = {
            "id": task_id,
            "task": record.name,
            self._header: record.tenant,
            "headers": options.get("headers"),
            "callbacks": maybe_list(options.get("link")),
            "errbacks": maybe_list(options.get("link_error")),
            "chain": options.get("chain"),
            "chord": options.get("chord"),
            "group": options.get("group_id"),
            "root_id": options.get("root_id") or task_id,
            "parent_id": options.get("parent_id"),
            "retries": options.get("retries") or 0,
            "delivery_info": {"is_eager": False},
        }
        trace = build_tracer(record.name, task, app=self._celery, propagate=True)
        return trace(task_id, record.args, record.kwargs, request).retval


@pytest.fixture
def enqueued_tasks(
    tenant_jobs: TenantJobs, monkeypatch: pytest.MonkeyPatch
) -> t.Iterator[EnqueuedTasks]:
    """Record tasks sent during the test instead of publishing them (eager mode too)."""
    celery_app = tenant_jobs.celery
    captured = EnqueuedTasks(celery_app)

    def record_instead_of_sending(
        name: str, args: t.Any = None, kwargs: t.Any = None, **options: t.Any
    ) -> t.Any:
        options = celery_app.stamp_tenant(name, options, kwargs)
        options["task_id"] = options.get("task_id") or str(uuid4())
        captured.record(name, args, kwargs, options)
        return celery_app.AsyncResult(options["task_id"])

    monkeypatch.setattr(celery_app, "send_task", record_instead_of_sending)
    always_eager = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = False
    try:
        yield captured
    finally:
        celery_app.conf.task_always_eager = always_eager


@pytest.fixture
def tenant_client(app: Flask) -> t.Callable[[str], FlaskClient]:
    """A factory: ``tenant_client("acme")`` is a test client whose requests go to acme."""

    def make(name: str) -> FlaskClient:
        extension = extension_of(app)
        with app.app_context():
            address = extension.resolver.address(extension.validate(name))
        client = app.test_client()
        open_request, session_transaction = client.open, client.session_transaction

        def open_for_tenant(*args: t.Any, **kwargs: t.Any) -> t.Any:
            args, kwargs = _addressed(address, args, kwargs)
            return open_request(*args, **kwargs)

        def session_transaction_for_tenant(*args: t.Any, **kwargs: t.Any) -> t.Any:
            """The tenant's session (each tenant has its own: docs/security.md)."""
            args, kwargs = _addressed(address, args or ("/",), kwargs)
            return session_transaction(*args, **kwargs)

        client.open = open_for_tenant  # type: ignore[method-assign]
        client.session_transaction = session_transaction_for_tenant  # type: ignore[method-assign]
        return client

    return make


def _addressed(
    address: Address, args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
) -> tuple[tuple[t.Any, ...], dict[str, t.Any]]:
    """The arguments of a request (or session transaction) made to go to the tenant."""
    kwargs = dict(kwargs)
    if address.headers:
        kwargs["headers"] = {**address.headers, **dict(kwargs.get("headers") or {})}
    if address.path_prefix and args and isinstance(args[0], str):
        args = (address.path_prefix + args[0], *args[1:])
    if address.base_url:
        kwargs.setdefault("base_url", address.base_url)
    return args, kwargs
