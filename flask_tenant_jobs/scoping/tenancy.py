"""Which tenant the scoping strategies scope to: read here, for both strategies.

Each strategy reads the tenant through these helpers only, so that "no tenant"
means the same everywhere: with ``TENANT_JOBS_REQUIRE_TENANT`` on and outside
``without_tenant()``, a statement that reaches tenant rows is refused.
"""

from __future__ import annotations

from .. import context
from ..errors import NoTenantError
from ..settings import current_settings


def tenant_is_missing() -> bool:
    """Whether no tenant is current where one is required (and not in ``without_tenant()``)."""
    return (
        context.get_tenant() is None
        and not context.is_unscoped()
        and current_settings().require_tenant
    )


def required_tenant(action: str) -> str | None:
    """The current tenant, or ``None`` where none is required; ``NoTenantError`` for ``action``
    where one is."""
    tenant = context.get_tenant()
    if tenant is None and tenant_is_missing():
        raise NoTenantError(action)
    return tenant


def scoping_tenant() -> str | None:
    """The tenant statements are scoped to now; ``None`` with no tenant or inside
    ``without_tenant()``. Never raises: see :func:`tenant_is_missing`."""
    return None if context.is_unscoped() else context.get_tenant()


def filter_tenant(action: str = "Querying a tenant-scoped model") -> str | None:
    """The tenant rows are filtered by: ``None`` means no filter (``without_tenant()``, or no
    tenant where none is required); ``NoTenantError`` for ``action`` where one is."""
    tenant = scoping_tenant()
    if tenant is None and tenant_is_missing():
        raise NoTenantError(action)
    return tenant
