"""Tenant tasks: jobs that carry the tenant current when they were created or sent.

Capture happens on the sending side: a signature (``.s()``, ``.si()``,
``.signature()``) takes the tenant current when it is built, and
``apply_async``/``delay``/``apply`` take the one current when they are called,
unless the ``headers`` already name one. The tenant travels as the message
header ``TENANT_JOBS_HEADER`` (``tenant_for_job``). Restoring it in the worker is
done in :mod:`flask_tenant_jobs.worker`.
"""

from __future__ import annotations

import typing as t
from contextlib import nullcontext

from celery import Celery, Task, shared_task
from celery.canvas import Signature
from celery.result import AsyncResult, allow_join_result
from flask import Flask, current_app, has_app_context

from . import context, signals
from .errors import ConfigurationError, NoTenantError

DEFAULT_HEADER = "tenant_for_job"
#: What to do when a tenant task is sent with no tenant current.
SEND_HINT = (
    "send it inside 'tenant_jobs.switch(name)' or a tenant request, name the tenant with "
    "headers={'tenant_for_job': name}, or send it to every tenant with "
    "'delay_for_each_tenant()'."
)
#: Request attribute holding the tenant error found when the task started.
TENANT_ERROR = "_tenant_jobs_error"


class TenantTask(Task):  # type: ignore[misc]
    """Base class of tasks that run in the tenant they were sent from.

    Subclass it to add ``on_failure`` and friends; they run in the task's tenant.
    In the task, ``current_tenant()`` and ``self.request.tenant_for_job`` name it.
    """

    abstract = True

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        """Refuse to run the body when the message's tenant was missing or unknown."""
        error = getattr(self.request, TENANT_ERROR, None)
        if error is not None:
            raise error
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
        or malformed one raises and no task is sent.
        """
        with self._app_context():
            extension = _extension(self._flask_app)
            names = (
                extension.tenant_names()
                if tenants is None
                else [extension.validate(name) for name in tenants]
            )
        headers = dict(options.pop("headers", None) or {})
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

    def _with_tenant(self, options: dict[str, t.Any], sent: bool = True) -> dict[str, t.Any]:
        """``options`` whose headers name a known tenant; linked signatures carry it too.

        ``sent``: the task is being sent (``task_enqueued`` fires), not run by ``apply()``
        (which eager ``apply_async`` also ends in: the signal fires once).
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
        for key in ("link", "link_error", "chord"):
            for sig in _signatures(options.get(key)):
                _stamp_signature(sig, header, tenant)
        if sent and signals.task_enqueued.receivers:
            signals.task_enqueued.send(self._flask_app, task=self.name, tenant=tenant)
        return {**options, "headers": headers}


def tenant_task(*args: t.Any, **options: t.Any) -> t.Any:
    """Like Celery's ``shared_task``, with :class:`TenantTask` (or a subclass) as base.

    Use as ``@tenant_task`` or ``@tenant_task(bind=True, max_retries=5, base=MyTask)``.
    """
    base = options.setdefault("base", TenantTask)
    if not (isinstance(base, type) and issubclass(base, TenantTask)):
        raise ConfigurationError(
            f"tenant_task(base={base!r}): the base must be TenantTask or a subclass of it."
        )
    return shared_task(*args, **options)


def flask_app_of(celery_app: Celery) -> Flask:
    """The Flask app a Celery app was made for (else the current Flask app)."""
    app = getattr(celery_app, "flask_app", None)
    if app is not None:
        return t.cast(Flask, app)
    if has_app_context():
        return t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    raise ConfigurationError(
        "This Celery app is not tied to a Flask app: use 'tenant_jobs.celery' (built from "
        "app.config['CELERY']) or push an app context."
    )


def header_name(celery_app: Celery) -> str:
    """The message header that carries the tenant for this Celery app."""
    return t.cast(str, getattr(celery_app, "tenant_header", DEFAULT_HEADER))


def _require_tenant_celery(task: TenantTask) -> None:
    """Refuse to send or run a tenant task through a Celery app that ``init_app`` did not make.

    Without ``app.config["CELERY"]`` the task would go to Celery's default app,
    which publishes to a broker on localhost, and no worker would restore its tenant.
    """
    flask_app = current_app if has_app_context() else None
    unconfigured = flask_app is not None and "celery" not in flask_app.extensions
    if getattr(task.app, "flask_app", None) is None or unconfigured:
        raise ConfigurationError(
            f"The tenant task {task.name!r} has no Celery app to go through: set "
            "app.config['CELERY'] to a dict of Celery settings, e.g. {'broker_url': "
            "'redis://127.0.0.1:6379/0'}, before 'tenant_jobs.init_app(app)'."
        )


def _extension(app: Flask) -> t.Any:
    try:
        return app.extensions["tenant_jobs"]
    except KeyError:
        raise ConfigurationError(
            f"TenantJobs is not set up on app {app.name!r}: call 'tenant_jobs.init_app(app)'."
        ) from None


def _signatures(value: t.Any) -> list[Signature]:
    if isinstance(value, Signature):
        return [value]
    if isinstance(value, (list, tuple)):
        return [sig for sig in value if isinstance(sig, Signature)]
    return []


def _stamp_signature(sig: Signature, header: str, tenant: str) -> None:
    """Give ``sig`` the tenant header unless it already names one."""
    headers = sig.options.get("headers") or {}
    if header not in headers:
        sig.options["headers"] = {**headers, header: tenant}
