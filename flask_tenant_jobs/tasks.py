"""Tenant tasks: jobs that carry the tenant current when they were created or sent.

Capture happens on the sending side: a signature (``.s()``, ``.si()``,
``.signature()``) takes the tenant current when it is built, and
``apply_async``/``delay``/``apply`` take the one current when they are called,
unless the ``headers`` already name one. The tenant travels as the message
header ``TENANT_JOBS_HEADER`` (``tenant_for_job``). Restoring it in the worker is
done in :mod:`flask_tenant_jobs.worker`.

Celery's ``task.map()``, ``task.starmap()`` and ``task.chunks()`` send its own
wrapper tasks (``celery.map``, ``celery.starmap``), which call the tenant task's
body in place; they carry and restore the tenant as the tenant task would.
"""

from __future__ import annotations

import typing as t
from contextlib import nullcontext
from weakref import WeakSet

from celery import Celery, Task, shared_task
from celery.canvas import Signature
from celery.result import AsyncResult, allow_join_result
from celery.utils.functional import maybe_list
from flask import Flask, current_app, has_app_context

from . import context, limits, signals
from .errors import ConfigurationError, NoTenantError
from .registry import validate_name

DEFAULT_HEADER = "tenant_for_job"
#: What to do when a tenant task is sent with no tenant current.
SEND_HINT = (
    "send it inside 'tenant_jobs.switch(name)' or a tenant request, name the tenant with "
    "headers={'tenant_for_job': name}, or send it to every tenant with "
    "'delay_for_each_tenant()'."
)
#: What to do when a tenant task's body is called with no tenant current.
CALL_HINT = (
    "call it inside 'tenant_jobs.switch(name)', or send it ('delay()', 'apply_async()', "
    "'map()', 'starmap()', 'chunks()'), which carries the current tenant to the worker."
)
#: Request attribute holding the tenant error found when the task started.
TENANT_ERROR = "_tenant_jobs_error"
#: Celery's built-in tasks that run another task's body in place: ``task.map()``,
#: ``task.starmap()`` and ``task.chunks()`` send them, with the task's signature in
#: their ``task`` argument.
WRAPPER_TASKS = frozenset({"celery.map", "celery.starmap", "celery.chunks"})
#: The ``broker_transport`` fair dispatch selects (see flask_tenant_jobs/fair/setup.py).
FAIR_TRANSPORT = "flask_tenant_jobs.fair.transport:FairTransport"
#: The Flask apps ``TenantJobs`` was set up on, for Celery apps not made by it.
_FLASK_APPS: WeakSet[Flask] = WeakSet()


class TenantTask(Task):  # type: ignore[misc]
    """Base class of tasks that run in the tenant they were sent from.

    Subclass it to add ``on_failure`` and friends; they run in the task's tenant.
    In the task, ``current_tenant()`` and ``self.request.tenant_for_job`` name it.
    """

    abstract = True
    #: At most this many executions at once per tenant (``None``: no limit); see limits.py.
    tenant_concurrency: int | None = None
    #: At most this rate of starts per tenant, in Celery's syntax (``"20/s"``).
    tenant_rate_limit: str | float | None = None
    #: Tasks with the same key share one limit (default: the task's name).
    tenant_limit_key: str | None = None

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        """Refuse to run the body when the message's tenant was missing or unknown, or
        when no tenant is current (a direct call, or a wrapper task's call in place)."""
        error = getattr(self.request, TENANT_ERROR, None)
        if error is not None:
            raise error
        if context.get_tenant() is None:
            raise _no_tenant_to_run(self)
        return super().__call__(*args, **kwargs)

    def signature(self, args: t.Any = None, *starargs: t.Any, **starkwargs: t.Any) -> Signature:
        """A signature that carries the tenant current now (if any)."""
        sig = super().signature(args, *starargs, **starkwargs)
        tenant = context.get_tenant()
        if tenant is not None:
            _stamp_signature(sig, self._header, tenant)
        return sig

    subtask = signature

    def apply_async(
        self, args: t.Any = None, kwargs: t.Any = None, **options: t.Any
    ) -> AsyncResult:
        """Send the task carrying the tenant named in ``headers``, else the current one."""
        return super().apply_async(args, kwargs, **self._with_tenant(options))

    def apply(self, args: t.Any = None, kwargs: t.Any = None, **options: t.Any) -> t.Any:
        """Run the task here and now, exactly as a worker would (tenant restored and reset)."""
        return super().apply(args, kwargs, **self._with_tenant(options, sent=False))

    def on_replace(self, sig: Signature) -> t.Any:
        """Replace the task; in eager mode too (Celery's eager replace would refuse to join)."""
        if self.request.is_eager:
            with allow_join_result():
                return super().on_replace(sig)
        return super().on_replace(sig)

    def apply_for_each_tenant(
        self,
        args: t.Any = None,
        kwargs: t.Any = None,
        tenants: t.Iterable[str] | None = None,
        **options: t.Any,
    ) -> list[AsyncResult]:
        """Send the task once per tenant (or per name in ``tenants``), each in its tenant.

        The names in ``tenants`` are all checked before anything is sent: an unknown
        or malformed one raises and no task is sent. A tenant named in ``headers``
        pins the task to that tenant only (``tenants``, if given, must name just it).
        """
        headers = dict(options.pop("headers", None) or {})
        names = fan_out_names(tenants, headers.get(self._header), "apply_for_each_tenant()")
        with self._app_context():
            extension = _extension(self._flask_app)
            names = (
                extension.tenant_names()
                if names is None
                else [extension.validate(name) for name in names]
            )
        with self.app.producer_or_acquire(options.pop("producer", None)) as producer:
            return [
                self.apply_async(
                    args, kwargs, producer=producer, headers={**headers, self._header: name},
                    **options,
                )
                for name in names
            ]

    def delay_for_each_tenant(self, *args: t.Any, **kwargs: t.Any) -> list[AsyncResult]:
        """Send the task once per tenant with these arguments, each in its own tenant."""
        return self.apply_for_each_tenant(args, kwargs)

    @property
    def _flask_app(self) -> Flask:
        return flask_app_of(self.app)

    @property
    def _header(self) -> str:
        return header_name(self.app)

    def _app_context(self) -> t.ContextManager[t.Any]:
        """The Flask app context to look tenants up in: the current one, else a new one."""
        return nullcontext() if has_app_context() else self._flask_app.app_context()

    def _with_tenant(
        self, options: dict[str, t.Any], sent: bool = True, sent_as: str | None = None
    ) -> dict[str, t.Any]:
        """``options`` whose headers name a known tenant; linked signatures carry it too.

        ``sent``: the task is being sent (``task_enqueued`` fires, naming ``sent_as`` or
        this task), not run by ``apply()`` (which eager ``apply_async`` also ends in: the
        signal fires once). The caller's ``link``/``link_error``/``chord`` signatures are
        never changed: copies carry the tenant.
        """
        _require_tenant_celery(self)
        header = self._header
        headers = dict(options.get("headers") or {})
        tenant = headers.get(header)
        if tenant is None:
            tenant = context.get_tenant()
            if tenant is None:
                raise NoTenantError(f"Sending the tenant task {self.name!r}", SEND_HINT)
        else:
            with self._app_context():
                tenant = _extension(self._flask_app).validate(tenant)
        headers[header] = tenant
        if sent:
            _stamp_limit(self, headers)
        stamped = {
            key: _stamped_copies(options[key], header, tenant)
            for key in ("link", "link_error", "chord")
            if options.get(key)
        }
        if sent and signals.task_enqueued.receivers:
            signals.task_enqueued.send(
                self._flask_app, task=sent_as or self.name, tenant=tenant
            )
        return {**options, **stamped, "headers": headers}


def tenant_task(*args: t.Any, **options: t.Any) -> t.Any:
    """Like Celery's ``shared_task``, with :class:`TenantTask` (or a subclass) as base.

    Use as ``@tenant_task`` or ``@tenant_task(bind=True, max_retries=5, base=MyTask)``.
    """
    limits.check_options(options)
    base = options.setdefault("base", TenantTask)
    if not (isinstance(base, type) and issubclass(base, TenantTask)):
        raise ConfigurationError(
            f"tenant_task(base={base!r}): the base must be TenantTask or a subclass of it."
        )
    return shared_task(*args, **options)


def register_flask_app(app: Flask) -> None:
    """Remember a Flask app ``TenantJobs`` is set up on, for Celery apps it did not make."""
    _FLASK_APPS.add(app)


def flask_apps() -> list[Flask]:
    """The Flask apps ``TenantJobs`` is set up on in this process."""
    return list(_FLASK_APPS)


def flask_app_of(celery_app: Celery) -> Flask:
    """The Flask app a Celery app was made for, else the one it can only belong to."""
    app = find_flask_app(celery_app)
    if app is None:
        raise ConfigurationError(
            f"The Celery app {celery_app.main!r} is not tied to a Flask app using TenantJobs: "
            "use 'tenant_jobs.celery' (built from app.config['CELERY']), set "
            "app.extensions['celery'] to it, or push the Flask app's context."
        )
    return app


def find_flask_app(celery_app: Celery) -> Flask | None:
    """The Flask app of ``celery_app``: the one ``TenantJobs`` made it for; else the current
    app; else the app whose ``extensions["celery"]`` it is, or the only ``TenantJobs`` app
    (Flask's own Celery pattern, ``celery_init_app``). ``None`` when none or ambiguous."""
    app = getattr(celery_app, "flask_app", None)
    if app is not None:
        return t.cast(Flask, app)
    if has_app_context() and "tenant_jobs" in current_app.extensions:
        return t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    apps = flask_apps()
    owners = [app for app in apps if app.extensions.get("celery") is celery_app]
    candidates = owners or apps
    return candidates[0] if len(candidates) == 1 else None


def header_name(celery_app: Celery) -> str:
    """The message header that carries the tenant for this Celery app."""
    header = getattr(celery_app, "tenant_header", None)
    if header is not None:
        return t.cast(str, header)
    app = find_flask_app(celery_app)
    return str(app.config.get("TENANT_JOBS_HEADER") or DEFAULT_HEADER) if app else DEFAULT_HEADER


def wrapped_task(
    celery_app: Celery, name: object, kwargs: object
) -> tuple[TenantTask, object] | None:
    """For a ``celery.map``/``starmap``/``chunks`` message running a tenant task: that
    task and the tenant its signature carries (or ``None``); else ``None``."""
    if name not in WRAPPER_TASKS or not isinstance(kwargs, dict):
        return None
    sig = kwargs.get("task")
    inner_name = sig.get("task") if isinstance(sig, dict) else None
    task = celery_app.tasks.get(inner_name) if isinstance(inner_name, str) else None
    if not isinstance(task, TenantTask):
        return None
    options = t.cast(dict[str, t.Any], sig).get("options")
    headers = options.get("headers") if isinstance(options, dict) else None
    tenant = headers.get(header_name(celery_app)) if isinstance(headers, dict) else None
    return task, tenant


def fan_out_names(
    tenants: t.Iterable[str] | None, pinned: object, where: str
) -> list[str] | None:
    """The tenants a fan-out sends to: ``tenants``, or the one a tenant header pins
    (``None``: every tenant). Raises ``ConfigurationError`` for a single string and for a
    pinned tenant that ``tenants`` contradicts."""
    if isinstance(tenants, str):
        raise ConfigurationError(
            f"{where}: tenants={tenants!r} is a single string: give a list, e.g. "
            f"tenants=[{tenants!r}]."
        )
    names = None if tenants is None else list(tenants)
    if pinned is None:
        return names
    if names is not None and names != [pinned]:
        raise ConfigurationError(
            f"{where}: the headers pin the task to tenant {pinned!r} but tenants={names!r}: "
            "give one of the two (a pinned tenant means that tenant only)."
        )
    return [validate_name(pinned)]


def _require_tenant_celery(task: TenantTask) -> None:
    """Refuse to send or run a tenant task through a Celery app that no Flask app owns.

    Without ``app.config["CELERY"]`` (or Flask's own ``celery_init_app`` pattern, which
    sets ``app.extensions["celery"]``) the task would go to Celery's default app, which
    publishes to a broker on localhost, and no worker would restore its tenant.
    """
    if has_app_context() and "tenant_jobs" in current_app.extensions:
        owner: Flask = current_app
    else:
        owner = flask_app_of(task.app)
    if "celery" not in owner.extensions:
        raise ConfigurationError(
            f"The tenant task {task.name!r} has no Celery app to go through: set "
            "app.config['CELERY'] to a dict of Celery settings, e.g. {'broker_url': "
            "'redis://127.0.0.1:6379/0'}, before 'tenant_jobs.init_app(app)'."
        )


def _stamp_limit(task: TenantTask, headers: dict[str, t.Any]) -> None:
    """Give a task with per-tenant limits the header the fair transport counts it by.

    Limits are enforced by the fair-dispatch transport: sending such a task to a broker
    without it would run it unlimited, so that is refused (eager runs ignore limits).
    """
    limit = limits.limit_of(task)
    if limit is None or task.app.conf.task_always_eager:
        return
    if task.app.conf.broker_transport != FAIR_TRANSPORT:
        raise ConfigurationError(
            f"The task {task.name!r} has a per-tenant limit (tenant_concurrency or "
            "tenant_rate_limit), which the fair-dispatch transport enforces: set "
            "TENANT_JOBS_FAIR_DISPATCH = True (Redis broker), or remove the limit."
        )
    headers[limits.LIMIT_HEADER] = limit.header


def _extension(app: Flask) -> t.Any:
    try:
        return app.extensions["tenant_jobs"]
    except KeyError:
        raise ConfigurationError(
            f"TenantJobs is not set up on app {app.name!r}: call 'tenant_jobs.init_app(app)'."
        ) from None


def _no_tenant_to_run(task: TenantTask) -> Exception:
    """Why ``task``'s body may not run now: the error its wrapper task (``celery.map``...)
    met restoring the tenant, else ``NoTenantError``."""
    runner = task.app.current_worker_task
    error = getattr(getattr(runner, "request", None), TENANT_ERROR, None)
    if isinstance(error, Exception):
        return error
    return NoTenantError(f"Running the tenant task {task.name!r}", CALL_HINT)


def _stamped_copies(value: t.Any, header: str, tenant: str) -> t.Any:
    """``value`` (a signature or a list of them) with copies that carry ``tenant``."""
    if isinstance(value, Signature):
        return _stamped_copy(value, header, tenant)
    if isinstance(value, (list, tuple)):
        return [_stamped_copy(sig, header, tenant) for sig in maybe_list(value)]
    return value


def _stamped_copy(sig: t.Any, header: str, tenant: str) -> t.Any:
    """A copy of ``sig`` with the tenant header, unless it already names one (then ``sig``)."""
    if not isinstance(sig, Signature):
        return sig
    headers = sig.options.get("headers") or {}
    if header in headers:
        return sig
    copy = sig.clone()
    copy.options["headers"] = {**headers, header: tenant}
    return copy


def _stamp_signature(sig: Signature, header: str, tenant: str) -> None:
    """Give ``sig`` (one just made here) the tenant header unless it already names one."""
    headers = sig.options.get("headers") or {}
    if header not in headers:
        sig.options["headers"] = {**headers, header: tenant}
