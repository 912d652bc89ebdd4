"""The exceptions of flask-tenant-jobs: ``TenantError`` and its subclasses, each with what to do.

Every error says what went wrong and what to do about it, and carries the
tenant name (``.tenant``) where there is one. An error's ``args`` are the
arguments it was made with, so that it comes back whole from Celery's result
backend (which rebuilds it as ``cls(*args)``) and from pickling.
"""

from __future__ import annotations


class TenantError(Exception):
    """Base class of every flask-tenant-jobs error."""

    def __init__(self, message: str, tenant: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.tenant = tenant
        if tenant is not None:
            self.args = (message, tenant)

    def __str__(self) -> str:
        return self.message


class ConfigurationError(TenantError):
    """A ``TENANT_JOBS_*`` setting is missing or invalid."""


class InvalidTenantNameError(TenantError, ValueError):
    """A tenant name does not follow the naming rule (a DNS label)."""

    def __init__(self, tenant: object, reason: str = "") -> None:
        shown = repr(tenant) if len(repr(tenant)) <= 80 else repr(tenant)[:77] + "..."
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"Invalid tenant name {shown}{why}: use 1-63 lower-case letters, digits and "
            "inner hyphens (a DNS label, e.g. 'acme' or 'acme-eu').",
            tenant if isinstance(tenant, str) else None,
        )
        self.args = (tenant, reason) if reason else (tenant,)


class TenantNotFoundError(TenantError, LookupError):
    """The tenant name is well-formed but no such tenant exists."""

    def __init__(self, tenant: str) -> None:
        super().__init__(
            f"Unknown tenant {tenant!r}: add the name to 'TENANT_JOBS_TENANTS' or to the "
            "source it reads (e.g. your tenants table); 'flask tenant-jobs create' only makes "
            "a tenant's storage, it does not add the name.",
            tenant,
        )
        self.args = (tenant,)


class NoTenantError(TenantError, RuntimeError):
    """Tenant-scoped work was attempted while no tenant is current."""

    def __init__(self, action: str = "This operation", hint: str = "") -> None:
        super().__init__(
            f"{action} needs a current tenant, but none is set: "
            + (
                hint
                or "run it inside 'tenant_jobs.switch(name)' or a tenant request, or use "
                "'tenant_jobs.without_tenant()' for deliberate cross-tenant work."
            ),
        )
        self.args = (action, hint) if hint else (action,)


#: What to do about an object loaded in one tenant and read again in another.
RELOAD_HINT = (
    "read it inside that tenant's switch(), or load the object again in this tenant."
)


class TenantMismatchError(TenantError):
    """An object or statement names a tenant other than the current one."""

    def __init__(
        self, tenant: str | None, current: str | None, what: str, hint: str = ""
    ) -> None:
        super().__init__(
            f"{what} belongs to tenant {tenant!r} but the current tenant is {current!r}: "
            + (hint or "switch to that tenant first, or leave 'tenant_id' unset to assign it."),
            tenant,
        )
        self.args = (tenant, current, what, hint) if hint else (tenant, current, what)
        self.current = current


class TenantImmutableError(TenantError):
    """A persisted object's ``tenant_id`` was changed."""

    def __init__(self, tenant: str | None, new_tenant: object, what: str) -> None:
        super().__init__(
            f"{what} belongs to tenant {tenant!r}; its 'tenant_id' cannot change to "
            f"{new_tenant!r}. Copy the data into a new object inside the other tenant instead.",
            tenant,
        )
        self.args = (tenant, new_tenant, what)


class SchemaNotFoundError(TenantError, LookupError):
    """The tenant's PostgreSQL schema does not exist."""

    def __init__(self, tenant: str, schema: str) -> None:
        super().__init__(
            f"The schema {schema!r} of tenant {tenant!r} does not exist: create it with "
            f"'tenant_jobs.create({tenant!r})' or 'flask tenant-jobs create {tenant}'.",
            tenant,
        )
        self.args = (tenant, schema)
        self.schema = schema


class CacheClearError(TenantError):
    """``cache.clear()`` was called where the backend cannot clear one namespace only."""

    def __init__(self, tenant: str | None, backend: str) -> None:
        whose = f"tenant {tenant!r}'s keys" if tenant is not None else "the shared keys"
        super().__init__(
            f"The {backend} cache backend cannot clear {whose} alone, and clearing it all "
            "would wipe every tenant's cache: delete the keys you know (cache.delete_many, "
            "cache.delete_memoized), use SimpleCache or RedisCache, or clear every tenant "
            "deliberately inside 'tenant_jobs.without_tenant()'.",
            tenant,
        )
        self.args = (tenant, backend)


class TenantSourceError(TenantError):
    """The tenant source (``TENANT_JOBS_TENANTS``) failed and no recent list is left."""

    def __init__(self, reason: object, stale_seconds: float) -> None:
        super().__init__(
            f"The tenant source 'TENANT_JOBS_TENANTS' failed ({reason!s}) and no tenant list "
            f"read in the last {stale_seconds:.0f} s is left, so no tenant can be checked: "
            "fix the source (it is called again once per 'TENANT_JOBS_CACHE_SECONDS'), or "
            "raise 'TENANT_JOBS_STALE_SECONDS' to serve the last list longer."
        )
        self.args = (reason, stale_seconds)


#: Why a tenant signature was refused, and what to do about it.
_SIGNATURE_PROBLEMS = {
    "unsigned": (
        "without a signature: it was not sent by an app holding 'TENANT_JOBS_SIGNING_KEY'. "
        "Send it from the app (delay(), apply_async(), send_task()); while signing is being "
        "rolled out, 'TENANT_JOBS_ACCEPT_UNSIGNED' = True lets the messages queued before run"
    ),
    "malformed": (
        "with a malformed signature (flask-tenant-jobs writes a string 'v1:' and 64 hex "
        "digits): the message was not made by this library, so it does not run"
    ),
    "mismatch": (
        "with a signature that does not match it (made with another key, or for another task "
        "id, task or tenant): forged or copied from another message, so it does not run. "
        "After a key change, list the old key after the new one in 'TENANT_JOBS_SIGNING_KEY'"
    ),
}


class TenantSignatureError(TenantError):
    """A tenant task's message names its tenant without a valid signature (signing on)."""

    def __init__(self, task: object, task_id: object, tenant: object, problem: str) -> None:
        task, task_id, tenant = (_storable(value) for value in (task, task_id, tenant))
        why = _SIGNATURE_PROBLEMS.get(problem, problem)
        super().__init__(
            f"The tenant task {task!r} (id {task_id!r}) names tenant {tenant!r} {why}.",
            tenant,
        )
        self.args = (task, task_id, tenant, problem)
        self.problem = problem


def _storable(value: object) -> str:
    """``value`` from a message, as a short string (a result backend stores the error)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
