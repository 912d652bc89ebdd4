"""The ``TENANT_JOBS_*`` configuration, read once per app and checked up front.

Every key is one field of :class:`Settings`, declared with :func:`setting`: the
key is ``TENANT_JOBS_`` plus the field name in upper case, and the declaration
gives its default and the check that says which values it accepts. Adding a
key is adding one such line. ``init_app`` refuses any other ``TENANT_JOBS_*``
key, naming the closest known one, so a misspelled key never passes silently.
"""

from __future__ import annotations

import difflib
import typing as t
from dataclasses import dataclass, field, fields

from flask import Flask, Request

from .errors import ConfigurationError

PREFIX = "TENANT_JOBS_"
STRATEGIES = ("column", "schema")
RESOLVERS = ("subdomain", "domain", "header", "path")

TenantSource = t.Iterable[str] | t.Callable[[], t.Iterable[str]]
ResolverSetting = str | t.Callable[[Request], str | None]
DomainSetting = t.Mapping[str, str] | t.Callable[[str], str | None]

#: A check takes the key and its value and returns the value to keep, or raises
#: ``ConfigurationError`` saying what the key accepts.
Check = t.Callable[[str, t.Any], t.Any]
@dataclass(frozen=True)
class Required:
    """The default of a key that must be set: what to set it to."""

    accepted: str


@dataclass(frozen=True)
class AppDefault:
    """A default worked out from the app (e.g. from ``SERVER_NAME``)."""

    compute: t.Callable[[Flask], t.Any]


def setting(default: t.Any, check: Check, *, none_is_a_value: bool = False) -> t.Any:
    """Declare a key: its default (a value, an ``AppDefault`` or ``Required``) and its check.

    A key set to ``None`` takes its default, unless ``none_is_a_value`` (``None`` means off).
    """
    return field(metadata={"default": default, "check": check, "none": none_is_a_value})


# -- checks: each names the key and what it accepts -------------------------------------------


def _refuse(key: str, value: t.Any, accepted: str) -> ConfigurationError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ConfigurationError(f"'{key}' is {shown}: use {accepted}.")


def one_of(*choices: str) -> Check:
    """A check accepting one of ``choices``."""

    def check(key: str, value: t.Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _refuse(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return value

    return check


def boolean(key: str, value: t.Any) -> bool:
    """``True`` or ``False`` only: a string such as ``"false"`` would read as true."""
    if not isinstance(value, bool):
        raise _refuse(key, value, "True or False")
    return value


def seconds(key: str, value: t.Any) -> float:
    """A number of seconds, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise _refuse(key, value, "a number of seconds, 0 or more (e.g. 60)")
    return float(value)


def positive_seconds(key: str, value: t.Any) -> float:
    """A number of seconds, more than 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _refuse(key, value, "a number of seconds, more than 0 (e.g. 60)")
    return float(value)


def text(key: str, value: t.Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise _refuse(key, value, "a non-empty string")
    return value


def optional_text(key: str, value: t.Any) -> str | None:
    """A non-empty string, or ``None``."""
    return None if value is None else text(key, value)


def whole_number(key: str, value: t.Any) -> int:
    """A whole number, 0 or more."""
    if type(value) is not int or value < 0:
        raise _refuse(key, value, "a whole number, 0 or more")
    return value


def _strings(key: str, value: t.Any, example: str) -> list[str]:
    """A list (tuple, set) of strings; a lone string would be read letter by letter."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise _refuse(key, value, f"a list of strings, e.g. {example}")
    if not all(isinstance(item, str) for item in value):
        raise _refuse(key, value, f"a list of strings only, e.g. {example}")
    return list(value)


def subdomain_list(key: str, value: t.Any) -> frozenset[str]:
    """A list of subdomain labels, compared lower-cased."""
    return frozenset(label.lower() for label in _strings(key, value, "['www', 'admin']"))


def path_list(key: str, value: t.Any) -> tuple[str, ...]:
    """A list of URL paths, each starting with ``/``."""
    found = _strings(key, value, "['/static', '/health']")
    if not all(path.startswith("/") for path in found):
        raise _refuse(key, value, "paths that start with '/', e.g. ['/static', '/health']")
    return tuple(found)


TENANTS_ACCEPTED = "a list of tenant names, or a zero-argument callable that returns them"


def tenant_source(key: str, value: t.Any) -> TenantSource:
    """A list of names, or a zero-argument callable returning them."""
    if callable(value):
        return t.cast(TenantSource, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, t.Iterable):
        raise _refuse(key, value, TENANTS_ACCEPTED)
    return t.cast(TenantSource, value)


def resolver_or_callable(key: str, value: t.Any) -> ResolverSetting:
    """A built-in resolver's name, or a callable ``(request) -> name or None``."""
    if callable(value):
        return t.cast(ResolverSetting, value)
    accepted = "one of " + ", ".join(repr(r) for r in RESOLVERS)
    if not isinstance(value, str) or value not in RESOLVERS:
        raise _refuse(key, value, f"{accepted}, or a callable (request) -> name or None")
    return value


def domain_map(key: str, value: t.Any) -> DomainSetting:
    """A mapping of host to tenant name, or a callable ``(host) -> name or None``."""
    if callable(value):
        return t.cast(DomainSetting, value)
    accepted = "a dict of host to tenant name, e.g. {'shop.acme.com': 'acme'}, or a callable"
    if not isinstance(value, t.Mapping) or not all(
        isinstance(host, str) and isinstance(name, str) for host, name in value.items()
    ):
        raise _refuse(key, value, accepted)
    return value


def domain_name(key: str, value: t.Any) -> str | None:
    """A domain name (its port and outer dots dropped, lower-cased), or ``None``."""
    if value is None:
        return None
    name = value.split(":", 1)[0].strip(".").lower() if isinstance(value, str) else ""
    if not name:
        raise _refuse(key, value, "a domain name such as 'example.test'")
    return name


def tenant_format(key: str, value: t.Any) -> str:
    """A format string with ``{tenant}`` and no other field."""
    accepted = "a string containing '{tenant}' and no other '{...}', e.g. 'tenant_{tenant}'"
    if not isinstance(value, str) or "{tenant}" not in value:
        raise _refuse(key, value, accepted)
    try:
        value.format(tenant="acme")
    except (KeyError, IndexError, ValueError):
        raise _refuse(key, value, accepted) from None
    return value


def _server_name(app: Flask) -> t.Any:
    return app.config.get("SERVER_NAME") or None


def _static_path(app: Flask) -> list[str]:
    return [app.static_url_path or "/static"]


# -- the keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Every ``TENANT_JOBS_*`` key: ``name = setting(default, check)``; see docs/configuration.md.

    A key set to ``None`` takes its default.
    """

    tenants: TenantSource = setting(Required(TENANTS_ACCEPTED), tenant_source)
    strategy: str = setting("column", one_of(*STRATEGIES))
    resolver: ResolverSetting = setting("subdomain", resolver_or_callable)
    header: str = setting("tenant_for_job", text)
    require_tenant: bool = setting(True, boolean)
    base_domain: str | None = setting(AppDefault(_server_name), domain_name)
    excluded_subdomains: frozenset[str] = setting(["www"], subdomain_list)
    excluded_paths: tuple[str, ...] = setting(AppDefault(_static_path), path_list)
    request_header: str = setting("X-Tenant", text)
    domains: DomainSetting = setting({}, domain_map)
    cache_seconds: float = setting(60.0, seconds)
    stale_seconds: float = setting(600.0, seconds)
    schema_format: str = setting("tenant_{tenant}", tenant_format)
    shared_schema: str = setting("public", text)
    scope_caches: bool = setting(True, boolean)
    shared_session: bool = setting(False, boolean)
    otel_attribute: str | None = setting("tenant", optional_text, none_is_a_value=True)
    sql_comment: bool = setting(False, boolean)
    metrics: bool = setting(True, boolean)
    metrics_max_tenants: int = setting(100, whole_number)
    rls: bool = setting(False, boolean)
    fair_dispatch: bool = setting(False, boolean)
    slot_ttl: float = setting(60.0, positive_seconds)

    @classmethod
    def from_app(cls, app: Flask) -> Settings:
        """Read and check the settings of ``app``; raise ``ConfigurationError`` if wrong."""
        _refuse_unknown_keys(app.config)
        values = {f.name: _read(app, PREFIX + f.name.upper(), f.metadata) for f in fields(cls)}
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        """What no single key can check alone."""
        if self.resolver == "subdomain" and not self.base_domain:
            raise ConfigurationError(
                "The subdomain resolver needs a base domain: set 'SERVER_NAME' or "
                "'TENANT_JOBS_BASE_DOMAIN' (e.g. 'example.test')."
            )
        if self.rls:
            self._check_rls()

    def _check_rls(self) -> None:
        """Row-level security fails closed, so it needs the column strategy and a tenant."""
        if self.strategy != "column":
            raise ConfigurationError(
                "'TENANT_JOBS_RLS' is for the column strategy, but 'TENANT_JOBS_STRATEGY' is "
                f"{self.strategy!r}, where each tenant's rows are in its own schema: turn "
                "TENANT_JOBS_RLS off."
            )
        if not self.require_tenant:
            raise ConfigurationError(
                "'TENANT_JOBS_RLS' fails closed (no tenant: the database shows no tenant "
                "rows), which contradicts 'TENANT_JOBS_REQUIRE_TENANT' = False (no tenant: "
                "every row): set TENANT_JOBS_REQUIRE_TENANT to True and do cross-tenant work "
                "inside tenant_jobs.without_tenant()."
            )


def known_keys() -> list[str]:
    """Every ``TENANT_JOBS_*`` key that :class:`Settings` declares."""
    return [PREFIX + f.name.upper() for f in fields(Settings)]


def _read(app: Flask, key: str, spec: t.Mapping[str, t.Any]) -> t.Any:
    """The checked value of ``key``: the config's, else its default."""
    value = app.config.get(key)
    if value is None and not (spec["none"] and key in app.config):
        value = spec["default"]
        if isinstance(value, AppDefault):
            value = value.compute(app)
        if isinstance(value, Required):
            raise ConfigurationError(f"'{key}' is not set: set it to {value.accepted}.")
    return spec["check"](key, value)


def _refuse_unknown_keys(config: t.Mapping[str, t.Any]) -> None:
    """Raise for a ``TENANT_JOBS_*`` key that no field declares, naming the closest one."""
    known = known_keys()
    for key in config:
        if isinstance(key, str) and key.startswith(PREFIX) and key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
            raise ConfigurationError(
                f"Unknown setting '{key}': did you mean '{close[0]}'? The known keys are "
                "listed in docs/configuration.md."
            )



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
