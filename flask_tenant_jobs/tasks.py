"""Tenant tasks: the task class of jobs that run in the tenant they were sent from.

Capture: a signature (``.s()``, ``.si()``, ``.signature()``) takes the tenant
current when it is built, and ``apply_async``/``delay``/``apply`` take the one
current when they are called, unless the ``headers`` already name one; both go
through :func:`~flask_tenant_jobs.sending.stamp_options`. The worker restores the
tenant before the task runs (:mod:`flask_tenant_jobs.worker`); ``__call__`` refuses
to run the body without it.

Celery's ``task.map()``, ``task.starmap()`` and ``task.chunks()`` send its own
wrapper tasks (``celery.map``, ``celery.starmap``), which call the tenant task's
body in place; they carry and restore the tenant as the tenant task would.
"""

from __future__ import annotations

import sys
import typing as t

from celery import Celery, Task, shared_task
from celery import result as celery_result
from celery.canvas import Signature
from celery.result import allow_join_result

from . import context, limits, runs
from .errors import ConfigurationError, NoTenantError
from .results import TenantAsyncResult
from .sending import (
    WRAPPER_TASKS,
    app_context_of,
    capture_tenant,
    fan_out_names,
    flask_app_of,
    header_name,
    stamp_options,
)
from .state import extension_of

#: What to do when a tenant task's body is called with no tenant current.
CALL_HINT = (
    "call it inside 'tenant_jobs.switch(name)', or send it ('delay()', 'apply_async()', "
    "'map()', 'starmap()', 'chunks()'), which carries the current tenant to the worker."
)

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
        when no tenant is current (a direct call, or a wrapper task's call in place).

        Changed: the worker's call runs ``run()`` directly, as Celery does for tasks
        without a ``__call__``, instead of pushing the task and its request again."""
        run = runs.current()
        if run is not None and run.error is not None:
            raise run.error  # this run's tenant (or its wrapper task's) was refused
        if context.get_tenant() is None:
            raise NoTenantError(f"Running the tenant task {self.name!r}", CALL_HINT)
        if run is not None and run.call_pending and run.task is self:
            # the tracer's own call: it pushed this task and its request already, as it
            # does before calling ``run()`` of a task with no ``__call__`` of its own
            run.call_pending = False
            return self.run(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def signature(self, args: t.Any = None, *starargs: t.Any, **starkwargs: t.Any) -> Signature:
        """A signature that carries the tenant current now (if any)."""
        sig = super().signature(args, *starargs, **starkwargs)
        tenant = context.get_tenant()
        if tenant is not None:
            capture_tenant(sig, header_name(self.app), tenant)
        return sig

    subtask = signature

    def AsyncResult(self, task_id: str, **kwargs: t.Any) -> celery_result.AsyncResult:
        """The result of task ``task_id``, read only in the tenant the task ran in
        (:class:`~flask_tenant_jobs.results.TenantAsyncResult`).

        The handles Celery itself makes while sending (what ``delay()``,
        ``apply_async()`` and canvas return) are Celery's own: they belong to the
        caller who sent the task.
        """
        if _called_from_celery():
            return super().AsyncResult(task_id, **kwargs)
        return TenantAsyncResult(
            task_id, backend=self.backend, task_name=self.name, app=self.app, **kwargs
        )

    def apply_async(
        self, args: t.Any = None, kwargs: t.Any = None, **options: t.Any
    ) -> celery_result.AsyncResult:
        """Send the task carrying the tenant named in ``headers``, else the current one."""
        return super().apply_async(args, kwargs, **stamp_options(self, options))

    def apply(self, args: t.Any = None, kwargs: t.Any = None, **options: t.Any) -> t.Any:
        """Run the task here and now, exactly as a worker would (tenant restored and reset)."""
        return super().apply(args, kwargs, **stamp_options(self, options, sent=False))

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
    ) -> list[celery_result.AsyncResult]:
        """Send the task once per tenant (or per name in ``tenants``), each in its tenant.

        The names in ``tenants`` are all checked before anything is sent: an unknown
        or malformed one raises and no task is sent. A tenant named in ``headers``
        pins the task to that tenant only (``tenants``, if given, must name just it).
        """
        headers = dict(options.pop("headers", None) or {})
        header = header_name(self.app)
        names = fan_out_names(tenants, headers.get(header), "apply_for_each_tenant()")
        with app_context_of(self.app):
            extension = extension_of(flask_app_of(self.app))
            names = (
                extension.tenant_names()
                if names is None
                else [extension.validate(name) for name in names]
            )
        with self.app.producer_or_acquire(options.pop("producer", None)) as producer:
            return [
                self.apply_async(
                    args, kwargs, producer=producer, headers={**headers, header: name},
                    **options,
                )
                for name in names
            ]

    def delay_for_each_tenant(
        self, *args: t.Any, **kwargs: t.Any
    ) -> list[celery_result.AsyncResult]:
        """Send the task once per tenant with these arguments, each in its own tenant."""
        return self.apply_for_each_tenant(args, kwargs)


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


def _called_from_celery() -> bool:
    """Whether the caller of ``TenantTask.AsyncResult`` is Celery's own code (sending a
    task or freezing a canvas), two frames up."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    return isinstance(caller, str) and caller.startswith("celery.")
