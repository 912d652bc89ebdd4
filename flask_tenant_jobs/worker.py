"""The worker side of tenant jobs: restoring the tenant before a task runs, resetting it after.

Every task of a Celery app made by :func:`~flask_tenant_jobs.sending.make_celery` runs between
``task_prerun`` and ``task_postrun`` with a pushed Flask app context and the
tenant of its message (none for plain tasks), and with scoping on. That window
covers the task's ``on_success``/``on_failure``/``on_retry`` handlers,
errbacks, and the chain steps, callbacks and chord bodies Celery publishes
after ``run()`` returns, so they all carry the same tenant. ``task_postrun``
runs in Celery's ``finally``: the tenant is reset whatever happened. A bad
tenant cannot be refused from ``task_prerun`` (Celery only logs errors there),
so the error is kept and raised by ``TenantTask.__call__`` before the body
runs; so is any error met while looking the tenant up (a tenant source or
database that is down). With ``TENANT_JOBS_SIGNING_KEY`` set, the tenant's
signature is checked first (:mod:`flask_tenant_jobs.signing`): an unsigned or
forged one is such an error too.

Tenant tasks on other Celery apps (Flask's own ``celery_init_app`` pattern) are
restored the same way, in the Flask app that app belongs to; so are Celery's
``celery.map``/``celery.starmap``/``celery.chunks`` wrappers of a tenant task.

When a handler raises (``on_failure``, ``on_retry``, an errback that cannot be
sent), Celery runs the failure handlers a second time after ``task_postrun``;
the tenant and app context are then kept until that second round ends.
"""

from __future__ import annotations

import logging
import sys
import typing as t
from contextvars import ContextVar

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_failure,
    task_internal_error,
    task_postrun,
    task_prerun,
    worker_process_init,
)
from celery.worker.control import control_command
from flask import Flask
from flask.ctx import AppContext

from . import context, registry, runs, signals
from .errors import (
    ConfigurationError,
    NoTenantError,
    TenantError,
    TenantNotFoundError,
    TenantSignatureError,
)
from .log import TenantLogFilter
from .sending import (
    DEFAULT_HEADER,
    TenantCelery,
    find_flask_app,
    flask_apps,
    header_name,
    send_hint,
    signer_of,
)
from .signing import Signer, signature_header
from .state import extension_of
from .tasks import TenantTask, wrapped_task

if t.TYPE_CHECKING:
    from .extension import TenantJobs

#: A worker meeting an unknown tenant reads the tenant source again, at most this often.
MISS_RELOAD_SECONDS = 1.0
#: The remote-control command that makes every worker read its tenant names again.
REFRESH_COMMAND = "tenant_jobs_refresh"


class _Unfinished(t.NamedTuple):
    """A task's run kept past ``task_postrun`` for Celery's second handler round."""

    task: Task
    run: runs.Run
    round_started: bool


#: Per thread and greenlet: the run kept for Celery's second round of handlers.
_UNFINISHED: ContextVar[_Unfinished | None] = ContextVar(
    "flask_tenant_jobs.unfinished", default=None
)


def tenant_of_request(request: t.Any, header: str = DEFAULT_HEADER) -> object:
    """The tenant a task request names: a request attribute (worker) or in ``headers``."""
    return header_of_request(request, header)


def header_of_request(request: t.Any, name: str) -> object:
    """The value of message header ``name`` of a task request: a request attribute
    (worker), else in ``request.headers``.

    Eager runs keep custom headers in ``request.headers``; tools such as
    sentry-sdk nest a ``headers`` dict in there, so both levels are read.
    """
    value = getattr(request, name, None)
    if value is not None:
        return value
    headers = getattr(request, "headers", None)
    if not isinstance(headers, dict):
        return None
    value = headers.get(name)
    nested = headers.get("headers")
    if value is None and isinstance(nested, dict):
        value = nested.get(name)
    return value


def _restore_tenant(
    sender: Task | None = None,
    task_id: object = None,
    task: Task | None = None,
    kwargs: t.Any = None,
    **_: t.Any,
) -> None:
    """Push the app context and enter the task's tenant (none for plain tasks)."""
    task = task or sender
    if task is None:
        return
    _finish_unfinished()  # a previous task's second handler round that never ended
    celery_app = task.app
    wrapped = wrapped_task(celery_app, task.name, kwargs)
    is_tenant_task = isinstance(task, TenantTask) or wrapped is not None
    if not isinstance(celery_app, TenantCelery) and not is_tenant_task:
        return  # a plain task of a Celery app this library did not make: not ours
    flask_app = find_flask_app(celery_app)
    if flask_app is None:
        runs.begin(runs.Run(task, task_id, error=_no_flask_app(celery_app)))
        return
    app_context = flask_app.app_context()
    app_context.push()
    tenant = error = None
    if is_tenant_task:
        try:
            tenant = _restorable_tenant(task, task.request, flask_app, wrapped)
        except Exception as raised:  # also a failing tenant source or database: Celery
            error = raised  # would only log it and run the body
    # the tracer calls a TenantTask next: that call runs the body (TenantTask.__call__)
    call_pending = isinstance(task, TenantTask)
    entered = context.start(tenant)
    runs.begin(runs.Run(task, task_id, app_context, entered, error, call_pending))
    if tenant is not None and signals.task_tenant_restored.receivers:
        signals.task_tenant_restored.send(flask_app, task=task.name, tenant=tenant)


def _reset_tenant(
    sender: Task | None = None, task_id: object = None, task: Task | None = None, **_: t.Any
) -> None:
    """Restore the previous tenant and pop the app context, whatever the task did.

    When an error is leaving Celery's tracer (a handler raised), Celery runs the
    failure handlers again after this: the run is kept for that round.
    """
    run = runs.current()
    if run is None or run.task is not (task or sender) or run.task_id != task_id:
        return
    runs.end(run)
    if run.app_context is None:
        return
    ran = t.cast(Task, run.task)
    if _handlers_run_again(ran):
        _UNFINISHED.set(_Unfinished(ran, run, round_started=False))
        return
    _undo(run)


def _handlers_run_again(task: Task) -> bool:
    """Whether Celery's tracer will run the failure handlers again after ``task_postrun``:
    an error (not ``Reject``) is propagating out of its handlers, and the run of ``task``
    is not eager (eager runs raise it to the caller instead)."""
    error = sys.exc_info()[1]
    return (
        isinstance(error, Exception)
        and not isinstance(error, (Reject, MemoryError))
        and not getattr(task.request, "is_eager", False)
    )


def _second_round_started(sender: Task | None = None, **_: t.Any) -> None:
    """``task_internal_error``: Celery's second handler round starts (or, the second time
    for one task, it raised too and is over)."""
    unfinished = _UNFINISHED.get()
    if unfinished is None or unfinished.task is not sender:
        return
    if unfinished.round_started:
        _finish_unfinished()
    else:
        _UNFINISHED.set(unfinished._replace(round_started=True))


def _second_round_ended(sender: Task | None = None, **_: t.Any) -> None:
    """``task_failure``: the second handler round is over; undo the kept run."""
    unfinished = _UNFINISHED.get()
    if unfinished is not None and unfinished.task is sender and unfinished.round_started:
        _finish_unfinished()


def _finish_unfinished() -> None:
    """Undo a run kept for a second handler round, if there is one."""
    unfinished = _UNFINISHED.get()
    if unfinished is not None:
        _UNFINISHED.set(None)
        _undo(unfinished.run)


def _undo(run: runs.Run) -> None:
    """Leave the run's tenant and pop its app context."""
    context.leave(t.cast(context.Entered, run.entered))
    t.cast(AppContext, run.app_context).pop()


def _no_flask_app(celery_app: Celery) -> ConfigurationError:
    """Why a tenant task of ``celery_app`` cannot run: no Flask app to restore it in."""
    return ConfigurationError(
        f"The tenant task's Celery app {celery_app.main!r} belongs to no single Flask app "
        "using TenantJobs: run the worker on 'tenant_jobs.celery', or set "
        "app.extensions['celery'] to this Celery app."
    )


def _restorable_tenant(
    task: Task, request: t.Any, flask_app: Flask, wrapped: tuple[TenantTask, object] | None
) -> str:
    """The tenant of ``task``'s ``request``, its signature checked (signing on) and the name
    validated; raises ``TenantSignatureError``, ``NoTenantError`` or ``TenantNotFoundError``."""
    celery_app = task.app  # a property of Celery's Task: read once
    header = header_name(celery_app)
    signer = signer_of(celery_app)
    raw = tenant_of_request(request, header)
    if raw is not None and signer is not None:
        signature = header_of_request(request, signature_header(header))
        signer.verify(task.name, request.id, raw, signature)
    elif raw is None and wrapped is not None:
        raw = _tenant_of_wrapper(task, request, wrapped[1], signer)
    if raw is None:
        what = f"{task.name!r} of the tenant task {wrapped[0].name!r}" if wrapped else None
        raise NoTenantError(
            f"The tenant task {what or repr(task.name)} (its message names no tenant)",
            send_hint(header) if wrapped else "",
        )
    try:
        tenant = _validate_reloading_once(extension_of(flask_app), raw)
    except TenantError:
        signals.tenant_not_found.send(flask_app, tenant=raw, source="task")
        raise
    setattr(request, header, tenant)
    return tenant


def _tenant_of_wrapper(
    task: Task, request: t.Any, inner_tenant: object, signer: Signer | None
) -> object:
    """The tenant of a ``celery.map``/``starmap``/``chunks`` message that names none in
    its headers: the one its tenant task's signature carries (in the message body: not
    with signing on, unless unsigned messages are accepted), else, when run in place
    (``apply()``, eager mode), the caller's. A tenant left only in the body with
    signing on raises ``TenantSignatureError``."""
    if inner_tenant is not None and (signer is None or signer.accept_unsigned):
        return inner_tenant
    caller = context.get_tenant() if request.is_eager else None
    if caller is None and inner_tenant is not None:
        raise TenantSignatureError(task.name, request.id, inner_tenant, "unsigned")
    return caller


def _validate_reloading_once(extension: TenantJobs, raw: object) -> str:
    """Validate ``raw``; an unknown tenant may be one created moments ago elsewhere, so
    the tenant source is read again first (at most once per ``MISS_RELOAD_SECONDS``)."""
    try:
        return extension.validate(raw)
    except TenantNotFoundError:
        if not extension.refresh(older_than=MISS_RELOAD_SECONDS):
            raise
        return extension.validate(raw)


def _dispose_engines_after_fork(**_: t.Any) -> None:
    """In a forked worker child, drop the pooled connections inherited from the parent."""
    for app in flask_apps():
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


@control_command(name=REFRESH_COMMAND)  # type: ignore[untyped-decorator]
def _refresh_tenants_command(state: t.Any) -> dict[str, str]:
    """Remote control: forget the cached tenant names in this worker and the pool
    processes it forked, so that a removed tenant is refused at once."""
    registry.refresh_everywhere()
    return {"ok": "tenant names will be read again"}


task_prerun.connect(_restore_tenant)
task_postrun.connect(_reset_tenant)
task_internal_error.connect(_second_round_started)
task_failure.connect(_second_round_ended)
worker_process_init.connect(_dispose_engines_after_fork)
after_setup_logger.connect(_add_tenant_to_worker_logs)
after_setup_task_logger.connect(_add_tenant_to_worker_logs)
