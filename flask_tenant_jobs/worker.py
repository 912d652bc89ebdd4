"""The Celery side: the app factory and how a worker restores and resets the tenant.

Every task of a Celery app made by :func:`make_celery` runs between
``task_prerun`` and ``task_postrun`` with a pushed Flask app context and the
tenant of its message (none for plain tasks). That window covers the task's
``on_success``/``on_failure``/``on_retry`` handlers, errbacks, and the chain
steps, callbacks and chord bodies Celery publishes after ``run()`` returns, so
they all carry the same tenant. ``task_postrun`` runs in Celery's ``finally``:
the tenant is reset whatever happened. A bad tenant cannot be refused from
``task_prerun`` (Celery only logs errors there), so the error is kept and
raised by ``TenantTask.__call__`` before the body runs; so is any error met
while looking the tenant up (a tenant source or database that is down).
"""

from __future__ import annotations

import logging
import typing as t
from weakref import WeakSet

from celery import Celery, Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_prerun,
    worker_process_init,
)
from flask import Flask

from . import context, signals
from .errors import NoTenantError, TenantError, TenantNotFoundError
from .log import TenantLogFilter
from .tasks import DEFAULT_HEADER, TENANT_ERROR, TenantTask

_RESTORE = "_tenant_jobs_restore"
#: A worker meeting an unknown tenant reads the tenant source again, at most this often.
MISS_RELOAD_SECONDS = 1.0
#: Flask apps whose database engines a forked worker child must not share.
_FLASK_APPS: WeakSet[Flask] = WeakSet()


class TenantCelery(Celery):  # type: ignore[misc]
    """A Celery app tied to one Flask app; ``send_task`` stamps tenant tasks too."""

    flask_app: Flask
    tenant_header: str

    def send_task(
        self, name: str, args: t.Any = None, kwargs: t.Any = None, **options: t.Any
    ) -> t.Any:
        """Send a task by name; a registered tenant task carries the current tenant."""
        return super().send_task(name, args, kwargs, **self.stamp_tenant(name, options))

    def stamp_tenant(self, name: str, options: dict[str, t.Any]) -> dict[str, t.Any]:
        """``options`` for sending task ``name``: a tenant task's headers name its tenant.

        An explicit tenant header is validated, as in ``apply_async``. Options that
        ``TenantTask.apply_async`` already checked (it passes ``task_type``) are kept.
        """
        task = self.tasks.get(name)
        if not isinstance(task, TenantTask) or isinstance(options.get("task_type"), TenantTask):
            return options
        return task._with_tenant(options)


def make_celery(app: Flask, header: str) -> TenantCelery:
    """Build the Celery app of ``app`` from ``app.config["CELERY"]`` (Flask's pattern)."""
    celery_app = TenantCelery(app.import_name)
    celery_app.config_from_object(app.config["CELERY"])
    if "beat_scheduler" not in app.config["CELERY"]:
        celery_app.conf.beat_scheduler = "flask_tenant_jobs.beat:TenantScheduler"
    celery_app.flask_app = app
    celery_app.tenant_header = header
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    _FLASK_APPS.add(app)
    return celery_app


def tenant_of_request(request: t.Any, header: str = DEFAULT_HEADER) -> object:
    """The tenant a task request names: a request attribute (worker) or in ``headers``.

    Eager runs keep custom headers in ``request.headers``; tools such as
    sentry-sdk nest a ``headers`` dict in there, so both levels are read.
    """
    value = getattr(request, header, None)
    if value is not None:
        return value
    headers = getattr(request, "headers", None)
    if not isinstance(headers, dict):
        return None
    value = headers.get(header)
    nested = headers.get("headers")
    if value is None and isinstance(nested, dict):
        value = nested.get(header)
    return value


def _restore_tenant(sender: Task | None = None, task: Task | None = None, **_: t.Any) -> None:
    """Push the app context and enter the task's tenant (none for plain tasks)."""
    task = task or sender
    celery_app = getattr(task, "app", None)
    if not isinstance(celery_app, TenantCelery) or task is None:
        return
    app_context = celery_app.flask_app.app_context()
    app_context.push()
    request = task.request
    tenant = None
    if isinstance(task, TenantTask):
        try:
            tenant = _restorable_tenant(task, celery_app)
        except Exception as error:  # also a failing tenant source or database: Celery
            setattr(request, TENANT_ERROR, error)  # would only log it and run the body
    setattr(request, _RESTORE, (app_context, context.enter(tenant)))
    if tenant is not None and signals.task_tenant_restored.receivers:
        signals.task_tenant_restored.send(celery_app.flask_app, task=task.name, tenant=tenant)


def _reset_tenant(sender: Task | None = None, task: Task | None = None, **_: t.Any) -> None:
    """Restore the previous tenant and pop the app context, whatever the task did."""
    task = task or sender
    restore = getattr(getattr(task, "request", None), _RESTORE, None)
    if restore is None:
        return
    app_context, token = restore
    delattr(task.request, _RESTORE)  # type: ignore[union-attr]
    context.leave(token)
    app_context.pop()


def _restorable_tenant(task: TenantTask, celery_app: TenantCelery) -> str:
    """The task's tenant, validated; raises ``NoTenantError``/``TenantNotFoundError``."""
    raw = tenant_of_request(task.request, celery_app.tenant_header)
    if raw is None:
        raise NoTenantError(f"The tenant task {task.name!r} (its message names no tenant)")
    extension = celery_app.flask_app.extensions["tenant_jobs"]
    try:
        tenant = _validate_reloading_once(extension, raw)
    except TenantError:
        signals.tenant_not_found.send(celery_app.flask_app, tenant=raw, source="task")
        raise
    setattr(task.request, celery_app.tenant_header, tenant)
    return tenant


def _validate_reloading_once(extension: t.Any, raw: object) -> str:
    """Validate ``raw``; an unknown tenant may be one created moments ago elsewhere, so
    the tenant source is read again first (at most once per ``MISS_RELOAD_SECONDS``)."""
    try:
        return t.cast(str, extension.validate(raw))
    except TenantNotFoundError:
        if not extension.refresh(older_than=MISS_RELOAD_SECONDS):
            raise
        return t.cast(str, extension.validate(raw))


def _dispose_engines_after_fork(**_: t.Any) -> None:
    """In a forked worker child, drop the pooled connections inherited from the parent."""
    for app in list(_FLASK_APPS):
        db = app.extensions.get("sqlalchemy")
        if db is not None:
            with app.app_context():
                for engine in db.engines.values():
                    engine.dispose(close=False)


def _add_tenant_to_worker_logs(logger: logging.Logger | None = None, **_: t.Any) -> None:
    """Let worker log formats use ``%(tenant)s``."""
    for handler in logger.handlers if logger is not None else ():
        if not any(isinstance(f, TenantLogFilter) for f in handler.filters):
            handler.addFilter(TenantLogFilter())


task_prerun.connect(_restore_tenant)
task_postrun.connect(_reset_tenant)
worker_process_init.connect(_dispose_engines_after_fork)
after_setup_logger.connect(_add_tenant_to_worker_logs)
after_setup_task_logger.connect(_add_tenant_to_worker_logs)
