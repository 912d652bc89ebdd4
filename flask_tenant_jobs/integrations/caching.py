"""Flask-Caching keys that belong to their tenant.

Flask-Caching keeps the backend of each ``Cache`` in ``app.extensions["cache"]``
and sends every read and write through it: ``cache.get``/``set``/..., the views
of ``@cache.cached`` and the results and version keys of ``@cache.memoize``.
:func:`scope_caches` makes that mapping wrap each backend stored in it, before
or after, in a :class:`TenantScopedCache`, which puts every key in the current
tenant's namespace (``tenant:acme:`` + key) or, with no tenant, in the shared
one (``shared:`` + key). The namespaces cannot overlap: a tenant name is a DNS
label, so it holds no colon, and ``acme``'s prefix is not a prefix of ``acme-eu``'s.
"""

from __future__ import annotations

import datetime as dt
import typing as t

from cachelib import RedisCache as CachelibRedisCache
from cachelib import SimpleCache as CachelibSimpleCache
from cachelib.base import NullCache as CachelibNullCache
from flask import Flask
from flask_caching.backends.base import BaseCache
from flask_caching.backends.nullcache import NullCache

from .. import context
from ..errors import CacheClearError

#: The namespace of keys written with no tenant current.
SHARED_NAMESPACE = "shared:"
#: Keys a Redis ``DEL`` is sent at most at once when a namespace is cleared.
CLEAR_BATCH = 500

Timeout = int | dt.timedelta | None
#: Backends whose keys can be cleared one prefix at a time (null caches hold none).
PREFIX_CLEARABLE = (CachelibSimpleCache, CachelibRedisCache, NullCache, CachelibNullCache)


def namespace() -> str:
    """The key prefix of the current tenant (``tenant:acme:``), or the shared one."""
    tenant = context.get_tenant()
    return SHARED_NAMESPACE if tenant is None else f"tenant:{tenant}:"


class TenantScopedCache(BaseCache):
    """A Flask-Caching backend that keeps every key in the current tenant's namespace.

    Every method of the cachelib cache API is scoped; any other attribute (a
    Redis client, a backend's own methods) is the wrapped :attr:`backend`'s,
    which sees raw keys.
    """

    def __init__(self, backend: BaseCache) -> None:
        # No BaseCache.__init__: the timeouts and settings are the backend's.
        self.backend = backend

    def __getattr__(self, name: str) -> t.Any:
        """Anything beyond the cache API is the backend's (e.g. ``_write_client``)."""
        if name == "backend":  # not set yet: being copied or unpickled
            raise AttributeError(name)
        return getattr(self.backend, name)

    def get(self, key: str) -> t.Any:
        """The value of ``key`` in the current namespace, or ``None``."""
        return self.backend.get(f"{namespace()}{key}")

    def has(self, key: str) -> bool:
        """Whether ``key`` is set in the current namespace."""
        return self.backend.has(f"{namespace()}{key}")

    def set(self, key: str, value: t.Any, timeout: Timeout = None) -> bool | None:
        """Set ``key`` in the current namespace."""
        return self.backend.set(f"{namespace()}{key}", value, timeout)

    def add(self, key: str, value: t.Any, timeout: Timeout = None) -> bool:
        """Set ``key`` in the current namespace unless it is set there already."""
        return self.backend.add(f"{namespace()}{key}", value, timeout)

    def delete(self, key: str) -> bool:
        """Delete ``key`` from the current namespace."""
        return self.backend.delete(f"{namespace()}{key}")

    def inc(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` to ``key`` in the current namespace."""
        return self.backend.inc(f"{namespace()}{key}", delta)

    def dec(self, key: str, delta: int = 1) -> int | None:
        """Subtract ``delta`` from ``key`` in the current namespace."""
        return self.backend.dec(f"{namespace()}{key}", delta)

    def get_many(self, *keys: str) -> list[t.Any]:
        """The values of ``keys`` in the current namespace, in order."""
        prefix = namespace()
        return self.backend.get_many(*[f"{prefix}{key}" for key in keys])

    def get_dict(self, *keys: str) -> dict[str, t.Any]:
        """``{key: value}`` for ``keys`` in the current namespace."""
        return dict(zip(keys, self.get_many(*keys), strict=True))

    def set_many(self, mapping: dict[str, t.Any], timeout: Timeout = None) -> list[t.Any]:
        """Set every item of ``mapping`` in the current namespace; return the keys set."""
        originals = _scoped_keys(mapping)
        done = self.backend.set_many(
            {scoped: mapping[key] for scoped, key in originals.items()}, timeout
        )
        return [originals[scoped] for scoped in done]

    def delete_many(self, *keys: str) -> list[t.Any]:
        """Delete ``keys`` from the current namespace; return the keys deleted."""
        originals = _scoped_keys(keys)
        return [originals[scoped] for scoped in self.backend.delete_many(*originals)]

    def unlink(self, *keys: str) -> t.Any:
        """Redis' non-blocking delete of ``keys`` in the current namespace, else ``delete_many``."""
        unlink = getattr(self.backend, "unlink", None)
        if not callable(unlink):
            return self.delete_many(*keys)
        prefix = namespace()
        return unlink(*[f"{prefix}{key}" for key in keys])

    def clear(self) -> bool:
        """Delete the current tenant's keys (no tenant: the shared ones), nobody else's.

        Inside ``tenant_jobs.without_tenant()`` the whole backend is cleared.
        Raises ``CacheClearError`` where the backend cannot delete one namespace
        alone (only SimpleCache, Redis and NullCache can).
        """
        if not context.is_unscoped():
            return _clear_namespace(self.backend, namespace())
        if isinstance(self.backend, PREFIX_CLEARABLE):
            return _clear_namespace(self.backend, "")  # Redis: a prefix with '*' stays literal
        return bool(self.backend.clear())


def _scoped_keys(keys: t.Iterable[str]) -> dict[str, str]:
    """``{namespaced key: key}`` for ``keys`` in the current namespace."""
    prefix = namespace()
    return {f"{prefix}{key}": key for key in keys}


def _clear_namespace(backend: BaseCache, prefix: str) -> bool:
    """Delete every key of ``backend`` that starts with ``prefix``, or refuse."""
    if isinstance(backend, CachelibSimpleCache):
        with backend._lock:
            for key in [key for key in backend._cache if str(key).startswith(prefix)]:
                del backend._cache[key]
        return True
    if isinstance(backend, CachelibRedisCache):
        pattern = _glob_escape(backend._get_prefix() + prefix) + "*"
        batch: list[bytes] = []
        for key in backend._read_client.scan_iter(match=pattern, count=CLEAR_BATCH):
            batch.append(key)
            if len(batch) == CLEAR_BATCH:
                backend._write_client.delete(*batch)
                batch.clear()
        if batch:
            backend._write_client.delete(*batch)
        return True
    if isinstance(backend, PREFIX_CLEARABLE):
        return True  # a null cache
    raise CacheClearError(context.get_tenant(), type(backend).__name__)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


class _ScopedBackends(dict[t.Any, t.Any]):
    """``app.extensions["cache"]``: each backend Flask-Caching stores is wrapped."""

    def __setitem__(self, cache: t.Any, backend: t.Any) -> None:
        if not isinstance(backend, TenantScopedCache):
            backend = TenantScopedCache(backend)
        super().__setitem__(cache, backend)


def scope_caches(app: Flask) -> None:
    """Put every Flask-Caching key of ``app`` in the current tenant's namespace.

    Covers the ``Cache`` objects set up on ``app`` already and those set up later.
    """
    stored = app.extensions.get("cache", {})
    if isinstance(stored, _ScopedBackends):
        return
    scoped = _ScopedBackends()
    for cache, backend in stored.items():
        scoped[cache] = backend
    app.extensions["cache"] = scoped
