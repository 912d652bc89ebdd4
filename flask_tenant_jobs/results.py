"""Results belong to their tenant: a tenant task's result is read in that tenant only.

The result backend of a :class:`~flask_tenant_jobs.sending.TenantCelery` stores the
tenant current when a task's state is stored (its run, a retry, a failure) in the
task's meta, under :data:`RESULT_TENANT`, also listed in the meta's
``stamped_headers`` so that Celery's database backend keeps it (in its ``stamps``
column, with ``result_extended``). ``TenantTask.AsyncResult(task_id)`` returns a
:class:`TenantAsyncResult`, whose every read of the stored meta checks it.
"""

from __future__ import annotations

import typing as t
from functools import cache

from celery import states
from celery.backends.base import Backend
from celery.result import AsyncResult

from . import context
from .errors import NoTenantError, TenantMismatchError

#: The task meta key holding the tenant a result belongs to.
RESULT_TENANT = "tenant_jobs_tenant"
#: What to do about a result of another tenant.
OTHER_TENANT_HINT = (
    "read a task's result in the tenant it ran in (inside 'tenant_jobs.switch(name)'), or "
    "inside 'tenant_jobs.without_tenant()' for deliberate cross-tenant work."
)


class TenantResultMeta:
    """Mixed into a result backend class: the meta of a stored state names its tenant."""

    def _get_result_meta(self, *args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:
        """Celery's task meta, plus the current tenant (none: nothing is added)."""
        meta: dict[str, t.Any] = super()._get_result_meta(*args, **kwargs)  # type: ignore[misc]
        tenant = context.get_tenant()
        if tenant is not None:
            meta[RESULT_TENANT] = tenant
            stamped = [h for h in meta.get("stamped_headers") or () if h != RESULT_TENANT]
            meta["stamped_headers"] = [*stamped, RESULT_TENANT]
        return meta


@cache
def tenant_backend_class(backend_class: type[Backend]) -> type[Backend]:
    """``backend_class`` storing the tenant with each result (one class per backend)."""
    return type(backend_class.__name__, (TenantResultMeta, backend_class), {})


class TenantAsyncResult(AsyncResult):  # type: ignore[misc]
    """A tenant task's result, read only in the tenant it ran in.

    Every read of the stored meta (``state``, ``status``, ``result``, ``info``,
    ``traceback``, ``get()``, ``ready()``, ``successful()``, ``failed()``,
    ``children``, ``date_done``...) and ``forget()``, ``revoke()``, ``exists()``
    raise ``NoTenantError`` with no tenant current and ``TenantMismatchError``
    when the result belongs to another tenant. A result not stored yet reads as
    ``PENDING``; ``forget()`` and ``revoke()`` need one stored in this tenant.
    """

    def get(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        """Wait for the result (Celery's ``get``), once it is known to be this tenant's."""
        self._get_task_meta()
        return super().get(*args, **kwargs)

    def maybe_throw(self, propagate: bool = True, callback: t.Any = None) -> t.Any:
        """Raise the task's error (Celery's ``maybe_throw``) only in its tenant."""
        self._get_task_meta()
        return super().maybe_throw(propagate=propagate, callback=callback)

    def forget(self) -> None:
        """Forget the stored result: only one stored in this tenant."""
        self._owned_meta()
        super().forget()

    def revoke(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Revoke the task: only one whose result is stored in this tenant (a queued
        task's is not: revoke it with ``celery_app.control.revoke`` after your own check)."""
        self._owned_meta()
        super().revoke(*args, **kwargs)

    def exists(self) -> bool:
        """Whether a result is stored: asked in its tenant only."""
        self._get_task_meta()
        return bool(super().exists())

    def _get_task_meta(self) -> dict[str, t.Any]:
        meta: dict[str, t.Any] = super()._get_task_meta()
        _check_owner(self.id, meta)
        return meta

    def _maybe_set_cache(self, meta: dict[str, t.Any] | None) -> t.Any:
        _check_owner(self.id, meta)
        return super()._maybe_set_cache(meta)

    def _owned_meta(self) -> dict[str, t.Any]:
        """The stored meta, which must name the current tenant (not merely be PENDING)."""
        meta = self._get_task_meta()
        if not context.is_unscoped() and meta.get(RESULT_TENANT) is None:
            raise TenantMismatchError(
                None, context.get_tenant(), f"The task {self.id!r}",
                "no result of it is stored yet, so it cannot be shown to be this tenant's: "
                "wait until it has started, or use 'celery_app.control.revoke' after your "
                "own check.",
            )
        return meta


def _check_owner(task_id: str, meta: dict[str, t.Any] | None) -> None:
    """Raise unless ``meta`` (a task's stored meta) may be read in the current tenant."""
    if context.is_unscoped():
        return
    tenant = context.get_tenant()
    if tenant is None:
        raise NoTenantError(
            f"Reading the result of the tenant task {task_id!r}",
            "read it inside 'tenant_jobs.switch(name)' or a tenant request.",
        )
    owner = meta.get(RESULT_TENANT) if meta else None
    if owner == tenant:
        return
    if owner is None and (not meta or meta.get("status") == states.PENDING):
        return  # nothing stored yet: PENDING, as Celery reads any unknown id
    raise TenantMismatchError(owner, tenant, f"The result of task {task_id!r}", OTHER_TENANT_HINT)
