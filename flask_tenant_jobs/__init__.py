"""flask-tenant-jobs: multi-tenant Flask, Flask-SQLAlchemy and Celery, end to end."""

from __future__ import annotations

from .errors import (
    ConfigurationError,
    InvalidTenantNameError,
    NoTenantError,
    SchemaNotFoundError,
    TenantError,
    TenantImmutableError,
    TenantMismatchError,
    TenantNotFoundError,
)
from .extension import TenantJobs, current_tenant
from .scoping.column import TenantScoped
from .tasks import TenantTask, tenant_task

__all__ = [
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
    "TenantTask",
    "current_tenant",
    "tenant_task",
]
