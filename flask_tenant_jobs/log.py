"""A logging filter that puts the current tenant on every log record.

Add it to a handler and use ``%(tenant)s`` in the format; records made with no
tenant show ``-``. Celery workers started for a ``TenantJobs`` app get it on
their handlers automatically.
"""

from __future__ import annotations

import logging

from . import context


class TenantLogFilter(logging.Filter):
    """Sets ``record.tenant`` to the current tenant name (``"-"`` when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops it."""
        record.tenant = context.get_tenant() or "-"
        return True
