"""flask-tenant-jobs: multi-tenant Flask, Flask-SQLAlchemy and Celery, end to end.

The public names load on first use, so that ``flask tenant-jobs worker -P gevent``
can monkey-patch before SQLAlchemy, Celery and kombu are imported (as the
``celery`` command does); primitives made before the patch would block greenlets.
"""

from __future__ import annotations

import importlib
import typing as t

from .errors import (
    CacheClearError,
    ConfigurationError,
    InvalidTenantNameError,
    NoTenantError,
    SchemaNotFoundError,
    TenantError,
    TenantImmutableError,
    TenantMismatchError,
    TenantNotFoundError,
    TenantSignatureError,
    TenantSourceError,
)

if t.TYPE_CHECKING:
    from .extension import TenantJobs, current_tenant
    from .scoping.column import TenantScoped
    from .tasks import TenantTask, tenant_task

_LAZY = {
    "TenantJobs": ".extension",
    "current_tenant": ".extension",
    "TenantScoped": ".scoping.column",
    "TenantTask": ".tasks",
    "tenant_task": ".tasks",
}


def __getattr__(name: str) -> t.Any:
    """Import a public name's module the first time the name is used."""
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CacheClearError",
    "ConfigurationError",
    "InvalidTenantNameError",
    "NoTenantError",
    "SchemaNotFoundError",
    "TenantError",
    "TenantImmutableError",
    "TenantJobs",
    "TenantMismatchError",
    "TenantNotFoundError",
    "TenantScoped",
    "TenantSignatureError",
    "TenantSourceError",
    "TenantTask",
    "current_tenant",
    "tenant_task",
]
