"""Request -> tenant name.

A resolver returns the candidate tenant name of a request, or ``None`` when
the request deliberately has no tenant (the apex domain, an excluded
subdomain, no tenant header). The candidate is validated and looked up by the
extension, so a resolver never needs to check it: anything that is not a
well-formed, known tenant answers 404.
"""

from __future__ import annotations

import typing as t

from flask import Request

from .settings import Settings

Resolver = t.Callable[[Request], str | None]

#: The attribute of a request that holds its resolver's answer: (candidate, error).
_ANSWER = "_tenant_jobs_candidate"


def request_host(request: Request) -> str:
    """The request's host, lower-cased, without port or trailing dot ('' if unusable)."""
    host = request.host.lower()
    if host.startswith("["):  # an IPv6 literal is never a tenant host
        return host
    return host.rsplit(":", 1)[0].rstrip(".")


def subdomain_resolver(settings: Settings) -> Resolver:
    """``acme.example.test`` -> ``"acme"``; the base domain and excluded subdomains -> None."""
    base = t.cast(str, settings.base_domain)
    suffix = "." + base
    excluded = settings.excluded_subdomains

    def resolve(request: Request) -> str | None:
        host = request_host(request)
        if host == base:
            return None
        if not host.endswith(suffix):
            return host or ""  # a foreign host: never a tenant name
        label = host[: -len(suffix)]
        return None if label in excluded else label

    return resolve


def domain_resolver(settings: Settings) -> Resolver:
    """A full host mapped to a tenant (custom domains); the base domain -> None."""
    domains = settings.domains
    lookup = domains if callable(domains) else {k.lower(): v for k, v in domains.items()}.get
    base = settings.base_domain

    def resolve(request: Request) -> str | None:
        host = request_host(request)
        if base and (host == base or host == f"www.{base}"):
            return None
        return lookup(host) or ""

    return resolve


def header_resolver(settings: Settings) -> Resolver:
    """The tenant named by a request header (``TENANT_JOBS_REQUEST_HEADER``); absent -> None."""
    header = settings.request_header

    def resolve(request: Request) -> str | None:
        return request.headers.get(header)

    return resolve


def path_resolver(settings: Settings) -> Resolver:
    """The first path segment: ``/acme/orders`` -> ``"acme"``; ``/`` -> None."""

    def resolve(request: Request) -> str | None:
        segment = request.path.lstrip("/").split("/", 1)[0]
        return segment or None

    return resolve


BUILTIN_RESOLVERS: dict[str, t.Callable[[Settings], Resolver]] = {
    "subdomain": subdomain_resolver,
    "domain": domain_resolver,
    "header": header_resolver,
    "path": path_resolver,
}


def make_resolver(settings: Settings) -> Resolver:
    """The resolver that ``TENANT_JOBS_RESOLVER`` names, or the user's callable, asked
    once per request."""
    if callable(settings.resolver):
        return once_per_request(settings.resolver)
    return once_per_request(BUILTIN_RESOLVERS[settings.resolver](settings))


def once_per_request(resolver: Resolver) -> Resolver:
    """``resolver``, its answer (or error) kept on the request: Flask opens the session,
    which needs the tenant, before the ``before_request`` hook that resolves it runs,
    and both must see the same answer."""

    def resolve(request: Request) -> str | None:
        memo = request.__dict__
        answer = memo.get(_ANSWER)
        if answer is None:
            try:
                answer = (resolver(request), None)
            except Exception as raised:
                answer = (None, raised)
            memo[_ANSWER] = answer
        candidate, error = answer
        if error is not None:
            raise error
        return t.cast("str | None", candidate)

    return resolve


def excluded_path_matcher(settings: Settings) -> t.Callable[[str], bool]:
    """Whether a path is one of ``TENANT_JOBS_EXCLUDED_PATHS`` or below one.

    ``/health`` covers ``/health`` and ``/health/db``, not ``/healthz``.
    """
    exact = frozenset(prefix.rstrip("/") or "/" for prefix in settings.excluded_paths)
    below = tuple(prefix.rstrip("/") + "/" for prefix in settings.excluded_paths)

    def is_excluded(path: str) -> bool:
        return path in exact or path.startswith(below)

    return is_excluded
