"""Celery beat for tenant tasks: one periodic entry runs once per tenant at each tick.

The tenant list is read at every tick (through the registry's cache), so tenants
added later are picked up without restarting beat. An entry may name a subset
with ``"options": {"tenants": ["acme", "globex"]}``, or pin one tenant with
``"options": {"headers": {"tenant_for_job": "globex"}}``; a tenant of a subset
that no longer exists is skipped with a warning and the others still run.
Subsets are checked when the schedule is loaded. Plain tasks are scheduled as
usual. :func:`~flask_tenant_jobs.sending.make_celery` makes this the default
``beat_scheduler``.
"""

from __future__ import annotations

import logging
import typing as t

from celery.beat import PersistentScheduler, ScheduleEntry

from .errors import ConfigurationError, TenantError
from .sending import fan_out_names, flask_app_of, header_name
from .state import extension_of
from .tasks import TenantTask

logger = logging.getLogger(__name__)


class TenantScheduler(PersistentScheduler):  # type: ignore[misc]
    """The default scheduler, fanning tenant-task entries out to every tenant."""

    def merge_inplace(self, schedule: t.Mapping[str, t.Any]) -> None:
        """Load the configured entries, refusing malformed tenant options at once."""
        for name, entry in schedule.items():
            options = entry.get("options") if isinstance(entry, dict) else entry.options
            _check_tenant_options(name, options or {}, header_name(self.app))
        super().merge_inplace(schedule)

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
        headers = options.get("headers") or {}
        with flask_app_of(self.app).app_context():
            subset = fan_out_names(
                options.pop("tenants", None), headers.get(header_name(self.app)), repr(entry.name)
            )
            if subset is not None:
                subset = _existing(subset, entry.name)
                if not subset:
                    return None
            results = task.apply_for_each_tenant(
                entry.args, entry.kwargs, tenants=subset, producer=producer, **options
            )
        return results[0] if results else None


def _check_tenant_options(name: str, options: t.Mapping[str, t.Any], header: str) -> None:
    """Raise ``ConfigurationError`` for an entry whose ``tenants`` is a string, holds a
    malformed name, or contradicts the tenant its headers pin."""
    where = f"beat_schedule entry {name!r}"
    headers = options.get("headers") or {}
    try:
        fan_out_names(options.get("tenants"), headers.get(header), where)
        for tenant in options.get("tenants") or ():
            fan_out_names(None, tenant, where)  # well-formed, else an error naming it
    except ConfigurationError:
        raise
    except TenantError as error:
        raise ConfigurationError(f"{where}: {error}") from None


def _existing(names: list[str], entry_name: str) -> list[str]:
    """The tenants of ``names`` that exist now; the others are skipped with a warning."""
    extension = extension_of()
    missing = [name for name in names if not extension.exists(name)]
    if missing:
        logger.warning(
            "beat entry %r: skipping tenant(s) %s, which no longer exist; the entry runs for "
            "the others. Remove them from its 'tenants' option.",
            entry_name, ", ".join(map(repr, missing)),
        )
    return [name for name in names if name not in missing]
