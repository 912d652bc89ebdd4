"""The ``TENANT_JOBS_*`` configuration, read once per app and checked up front."""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

from flask import Flask, Request

from .errors import ConfigurationError

STRATEGIES = ("column", "schema")
RESOLVERS = ("subdomain", "domain", "header", "path")

TenantSource = t.Iterable[str] | t.Callable[[], t.Iterable[str]]
ResolverSetting = str | t.Callable[[Request], str | None]
DomainSetting = t.Mapping[str, str] | t.Callable[[str], str | None]


@dataclass(frozen=True)
class Settings:
    """Every ``TENANT_JOBS_*`` key with its default; see docs/configuration.md."""

    strategy: str
    tenants: TenantSource
    resolver: ResolverSetting
    header: str
    require_tenant: bool
    base_domain: str | None
    excluded_subdomains: frozenset[str]
    excluded_paths: tuple[str, ...]
    request_header: str
    domains: DomainSetting
    cache_seconds: float
    stale_seconds: float
    schema_format: str
    shared_schema: str

    @classmethod
    def from_app(cls, app: Flask) -> Settings:
        """Read and validate the settings of ``app``; raise ``ConfigurationError`` if wrong."""
        config = app.config
        if "TENANT_JOBS_TENANTS" not in config:
            raise ConfigurationError(
                "'TENANT_JOBS_TENANTS' is not set: give it a list of tenant names or a "
                "zero-argument callable that returns them."
            )
        settings = cls(
            strategy=config.get("TENANT_JOBS_STRATEGY", "column"),
            tenants=config["TENANT_JOBS_TENANTS"],
            resolver=config.get("TENANT_JOBS_RESOLVER", "subdomain"),
            header=config.get("TENANT_JOBS_HEADER", "tenant_for_job"),
            require_tenant=bool(config.get("TENANT_JOBS_REQUIRE_TENANT", True)),
            base_domain=_base_domain(config.get("TENANT_JOBS_BASE_DOMAIN"), config),
            excluded_subdomains=frozenset(
                s.lower() for s in config.get("TENANT_JOBS_EXCLUDED_SUBDOMAINS", ["www"])
            ),
            excluded_paths=tuple(
                config.get("TENANT_JOBS_EXCLUDED_PATHS", [app.static_url_path or "/static"])
            ),
            request_header=config.get("TENANT_JOBS_REQUEST_HEADER", "X-Tenant"),
            domains=config.get("TENANT_JOBS_DOMAINS", {}),
            cache_seconds=float(config.get("TENANT_JOBS_CACHE_SECONDS", 60.0)),
            stale_seconds=float(config.get("TENANT_JOBS_STALE_SECONDS", 600.0)),
            schema_format=config.get("TENANT_JOBS_SCHEMA_FORMAT", "tenant_{tenant}"),
            shared_schema=config.get("TENANT_JOBS_SHARED_SCHEMA", "public"),
        )
        settings._check()
        return settings

    def _check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigurationError(
                f"'TENANT_JOBS_STRATEGY' is {self.strategy!r}: use one of {STRATEGIES}."
            )
        if not callable(self.resolver) and self.resolver not in RESOLVERS:
            raise ConfigurationError(
                f"'TENANT_JOBS_RESOLVER' is {self.resolver!r}: use one of {RESOLVERS} "
                "or a callable taking the request and returning a tenant name or None."
            )
        if self.resolver == "subdomain" and not self.base_domain:
            raise ConfigurationError(
                "The subdomain resolver needs a base domain: set 'SERVER_NAME' or "
                "'TENANT_JOBS_BASE_DOMAIN' (e.g. 'example.test')."
            )
        if self.cache_seconds < 0:
            raise ConfigurationError("'TENANT_JOBS_CACHE_SECONDS' must be 0 or more.")
        if self.stale_seconds < 0:
            raise ConfigurationError("'TENANT_JOBS_STALE_SECONDS' must be 0 or more.")
        if "{tenant}" not in self.schema_format:
            raise ConfigurationError(
                "'TENANT_JOBS_SCHEMA_FORMAT' must contain '{tenant}', e.g. 'tenant_{tenant}'."
            )
        if not self.header:
            raise ConfigurationError("'TENANT_JOBS_HEADER' must be a non-empty string.")


def _base_domain(explicit: str | None, config: t.Mapping[str, t.Any]) -> str | None:
    """The domain tenants are subdomains of: the setting, else ``SERVER_NAME`` without port."""
    domain = explicit or config.get("SERVER_NAME")
    if not domain:
        return None
    return str(domain).split(":", 1)[0].strip(".").lower()


def current_settings() -> Settings:
    """The settings of the current app's ``TenantJobs`` extension."""
    from flask import current_app

    try:
        extension = current_app.extensions["tenant_jobs"]
    except KeyError:
        raise ConfigurationError(
            "TenantJobs is not set up on this app: call 'tenant_jobs.init_app(app, db=db)'."
        ) from None
    return t.cast(Settings, extension.settings)
