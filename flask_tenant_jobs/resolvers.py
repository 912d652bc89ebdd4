"""Resolvers: request -> tenant name, and tenant name -> how a request addresses it.

A resolver returns the candidate tenant name of a request, or ``None`` when
the request deliberately has no tenant (an excluded path, the apex domain, an
excluded subdomain, no tenant header). The candidate is validated and looked
up by the extension, so a resolver never needs to check it: anything that is
not a well-formed, known tenant answers 404. :meth:`Resolver.address` is the
other direction (what ``tenant_client(name)`` sends), and
:meth:`Resolver.install` adds what the resolver needs in the app (the path
resolver: ``url_for`` fills in the tenant).

``TENANT_JOBS_RESOLVER`` names one of :data:`RESOLVERS`, or is a callable.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass, field
from functools import lru_cache

from flask import Flask, Request

from . import context
from .errors import ConfigurationError

if t.TYPE_CHECKING:
    from .settings import Settings

#: The attribute of a request that holds its resolver's answer: (candidate, error).
_ANSWER = "_tenant_jobs_candidate"
#: Hosts whose subdomain label a resolver keeps (a miss only costs working it out again),
#: and the longest host kept (a DNS name's length, with a port).
_HOSTS_KEPT = 4096
_LONGEST_HOST_KEPT = 260


@dataclass(frozen=True)
class Address:
    """How a request names a tenant: the URL it is sent to, its headers, its path prefix."""

    base_url: str | None = None
    headers: t.Mapping[str, str] = field(default_factory=dict)
    path_prefix: str = ""


class Resolver:
    """Reads the candidate tenant of a request, once per request; says how to address one.

    Subclasses implement :meth:`read` and, where they can, :meth:`address`.
    """

    #: The value of ``TENANT_JOBS_RESOLVER`` that picks this resolver.
    name: t.ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        exact = frozenset(path.rstrip("/") or "/" for path in settings.excluded_paths)
        below = tuple(path.rstrip("/") + "/" for path in settings.excluded_paths)
        self._excluded, self._excluded_below = exact, below

    def __call__(self, request: Request) -> str | None:
        """The request's candidate tenant (``None`` on an excluded path), read once.

        Flask opens the session, which needs the tenant, before the ``before_request``
        hook that resolves it runs, and both must see the same answer (or error).
        """
        if self.is_excluded(request.environ.get("PATH_INFO") or "/"):
            return None
        memo = request.__dict__
        answer = memo.get(_ANSWER)
        if answer is None:
            try:
                answer = (self.read(request), None)
            except Exception as raised:
                answer = (None, raised)
            memo[_ANSWER] = answer
        candidate, error = answer
        if error is not None:
            raise error
        return t.cast("str | None", candidate)

    def is_excluded(self, path: str) -> bool:
        """Whether ``path`` is one of ``TENANT_JOBS_EXCLUDED_PATHS`` or below one.

        ``/health`` covers ``/health`` and ``/health/db``, not ``/healthz``.
        """
        return path in self._excluded or path.startswith(self._excluded_below)

    def read(self, request: Request) -> str | None:
        """The candidate tenant name the request carries, or ``None``."""
        raise NotImplementedError

    def address(self, tenant: str) -> Address:
        """How a request names ``tenant``; ``ConfigurationError`` where this resolver cannot say."""
        raise ConfigurationError(
            f"tenant_client cannot address tenant {tenant!r} with resolver {self.name!r}: "
            "build the request yourself (e.g. client.get(url, headers=...))."
        )

    def install(self, app: Flask) -> None:
        """Add to ``app`` what this resolver needs besides reading requests (most: nothing)."""


def request_host(request: Request) -> str:
    """The request's host, lower-cased, without port or trailing dot ('' if unusable)."""
    return bare_host(request.host)


def bare_host(host: str) -> str:
    """``host`` (as Werkzeug validated it) lower-cased, without port or trailing dot."""
    host = host.lower()
    if host.startswith("["):  # an IPv6 literal is never a tenant host
        return host
    return host.rsplit(":", 1)[0].rstrip(".")


class SubdomainResolver(Resolver):
    """``acme.example.test`` -> ``"acme"``; the base domain and excluded subdomains -> None."""

    name = "subdomain"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        if not settings.base_domain:
            raise ConfigurationError(
                "The subdomain resolver needs a base domain: set 'SERVER_NAME' or "
                "'TENANT_JOBS_BASE_DOMAIN' (e.g. 'example.test')."
            )
        self._base = settings.base_domain
        self._suffix = "." + settings.base_domain
        self._excluded_labels = settings.excluded_subdomains
        self._kept_label_of = lru_cache(maxsize=_HOSTS_KEPT)(self._label_of)

    def read(self, request: Request) -> str | None:
        """The host's label below the base domain; a foreign host is never a tenant name.

        Worked out once per host: all of a tenant's requests name the same one."""
        host = request.host
        if len(host) > _LONGEST_HOST_KEPT:
            return self._label_of(host)
        return self._kept_label_of(host)

    def _label_of(self, host: str) -> str | None:
        """The label of ``host`` (``request.host``) below the base domain, or '' (foreign)."""
        host = bare_host(host)
        if host == self._base:
            return None
        if not host.endswith(self._suffix):
            return host or ""
        label = host[: -len(self._suffix)]
        return None if label in self._excluded_labels else label

    def address(self, tenant: str) -> Address:
        """The tenant's subdomain of the base domain."""
        return Address(base_url=f"http://{tenant}{self._suffix}/")


class DomainResolver(Resolver):
    """A full host mapped to a tenant (``TENANT_JOBS_DOMAINS``); the base domain -> None."""

    name = "domain"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        domains = settings.domains
        self._hosts = {} if callable(domains) else dict(domains)
        self._lookup = (
            domains if callable(domains) else {k.lower(): v for k, v in domains.items()}.get
        )
        base = settings.base_domain
        self._untenanted = frozenset({base, f"www.{base}"} if base else ())

    def read(self, request: Request) -> str | None:
        """The tenant the request's host maps to ('' for an unmapped host)."""
        host = request_host(request)
        if host in self._untenanted:
            return None
        return self._lookup(host) or ""

    def address(self, tenant: str) -> Address:
        """The first host the mapping gives ``tenant`` (a callable mapping cannot say)."""
        for host, name in self._hosts.items():
            if name == tenant:
                return Address(base_url=f"http://{host}/")
        return super().address(tenant)


class HeaderResolver(Resolver):
    """The tenant named by a request header (``TENANT_JOBS_REQUEST_HEADER``); absent -> None."""

    name = "header"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._header = settings.request_header

    def read(self, request: Request) -> str | None:
        """The header's value."""
        return request.headers.get(self._header)

    def address(self, tenant: str) -> Address:
        """The header, naming ``tenant``."""
        return Address(headers={self._header: tenant})


class PathResolver(Resolver):
    """The first path segment: ``/acme/orders`` -> ``"acme"``; ``/`` -> None."""

    name = "path"

    def read(self, request: Request) -> str | None:
        """The first segment of the path."""
        segment = request.path.lstrip("/").split("/", 1)[0]
        return segment or None

    def address(self, tenant: str) -> Address:
        """Paths below ``/<tenant>``."""
        return Address(path_prefix=f"/{tenant}")

    def install(self, app: Flask) -> None:
        """Views need no ``tenant`` argument, and ``url_for`` fills it in."""

        @app.url_value_preprocessor
        def drop_tenant_argument(endpoint: str | None, values: dict[str, t.Any] | None) -> None:
            if values:
                values.pop("tenant", None)

        @app.url_defaults
        def add_tenant_argument(endpoint: str, values: dict[str, t.Any]) -> None:
            if "tenant" not in values and app.url_map.is_endpoint_expecting(endpoint, "tenant"):
                values["tenant"] = context.get_tenant()


class CallableResolver(Resolver):
    """The user's ``TENANT_JOBS_RESOLVER`` callable ``(request) -> name or None``."""

    name = "a callable"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._read = t.cast("t.Callable[[Request], str | None]", settings.resolver)

    def read(self, request: Request) -> str | None:
        """What the callable answers."""
        return self._read(request)


#: The built-in resolvers, by the ``TENANT_JOBS_RESOLVER`` value that picks them.
RESOLVERS: dict[str, type[Resolver]] = {
    cls.name: cls for cls in (SubdomainResolver, DomainResolver, HeaderResolver, PathResolver)
}


def make_resolver(settings: Settings) -> Resolver:
    """The resolver that ``TENANT_JOBS_RESOLVER`` names, or the one asking the user's callable."""
    if callable(settings.resolver):
        return CallableResolver(settings)
    return RESOLVERS[settings.resolver](settings)
