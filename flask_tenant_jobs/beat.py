"""Celery beat for tenant tasks: one periodic entry runs once per tenant at each tick.

The tenant list is read at every tick (through the registry's cache), so tenants
added later are picked up without restarting beat. An entry may name a subset
with ``"options": {"tenants": ["acme", "globex"]}``. Plain tasks are scheduled
as usual. :func:`~flask_tenant_jobs.worker.make_celery` makes this the default
``beat_scheduler``.
"""

from __future__ import annotations

import typing as t

from celery.beat import PersistentScheduler, ScheduleEntry

from .tasks import TenantTask, flask_app_of


class TenantScheduler(PersistentScheduler):  # type: ignore[misc]
    """The default scheduler, fanning tenant-task entries out to every tenant."""

    def apply_async(
        self,
        entry: ScheduleEntry,
        producer: t.Any = None,
        advance: bool = True,
        **kwargs: t.Any,
    ) -> t.Any:
        """Send a due entry: once per tenant when its task is a tenant task."""
        task = self.app.tasks.get(entry.task)
        if not isinstance(task, TenantTask):
            return super().apply_async(entry, producer, advance, **kwargs)
        entry = self.reserve(entry) if advance else entry
        options = dict(entry.options)
        tenants = options.pop("tenants", None)
        with flask_app_of(self.app).app_context():
            results = task.apply_for_each_tenant(
                entry.args, entry.kwargs, tenants=tenants, producer=producer, **options
            )
        return results[0] if results else None
