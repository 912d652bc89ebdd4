"""Where tenant names come from: validation and a time-bounded cache.

The source is ``TENANT_JOBS_TENANTS``: a list, or a zero-argument callable
(for example one that reads a ``tenants`` table). The callable runs at most
once per ``TENANT_JOBS_CACHE_SECONDS``, so resolving a known tenant in a
request or a worker costs no SQL.
"""

from __future__ import annotations

import re
import threading
import time
import typing as t

from .errors import ConfigurationError, InvalidTenantNameError, TenantNotFoundError

#: A tenant name is a DNS label: 1-63 lower-case letters, digits and inner hyphens.
TENANT_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def is_valid_name(name: object) -> bool:
    """Return whether ``name`` is a well-formed tenant name."""
    return isinstance(name, str) and TENANT_NAME.fullmatch(name) is not None


def validate_name(name: object) -> str:
    """Return ``name`` if it is well-formed, else raise ``InvalidTenantNameError``."""
    if not is_valid_name(name):
        raise InvalidTenantNameError(name)
    return t.cast(str, name)


class TenantRegistry:
    """All tenant names of one app, cached for ``cache_seconds``."""

    def __init__(
        self,
        source: t.Iterable[str] | t.Callable[[], t.Iterable[str]],
        cache_seconds: float,
    ) -> None:
        self._source = source
        self._cache_seconds = cache_seconds
        self._names: frozenset[str] = frozenset()
        self._sorted: tuple[str, ...] = ()
        self._expires = -1.0
        self._loaded_at = -float("inf")
        self._lock = threading.Lock()
        if not callable(source):
            self._store(source)
            self._expires = float("inf")

    def names(self) -> tuple[str, ...]:
        """All tenant names, sorted."""
        self._refresh_if_stale()
        return self._sorted

    def exists(self, name: object) -> bool:
        """Return whether ``name`` is a known tenant; malformed names are never looked up."""
        if type(name) is str and name in self._names and time.monotonic() < self._expires:
            return True  # the fast path: only valid names are ever stored
        if not is_valid_name(name):
            return False
        self._refresh_if_stale()
        return name in self._names

    def require(self, name: object) -> str:
        """Return ``name`` if it is a known tenant, else raise the error that says why."""
        validated = validate_name(name)
        if not self.exists(validated):
            raise TenantNotFoundError(validated)
        return validated

    def invalidate(self, older_than: float = 0.0) -> bool:
        """Forget the cached names so the next lookup reads the source again.

        With ``older_than``, only names read longer ago than that many seconds are
        forgotten, which bounds how often misses can make the source be read.
        Returns whether they were forgotten.
        """
        if not callable(self._source) or time.monotonic() - self._loaded_at < older_than:
            return False
        self._expires = -1.0
        return True

    def _refresh_if_stale(self) -> None:
        if time.monotonic() < self._expires:
            return
        with self._lock:
            if time.monotonic() < self._expires:
                return
            source = t.cast(t.Callable[[], t.Iterable[str]], self._source)
            self._store(source())
            self._loaded_at = time.monotonic()
            self._expires = self._loaded_at + self._cache_seconds

    def _store(self, names: t.Iterable[str]) -> None:
        if isinstance(names, str):
            raise ConfigurationError(
                "'TENANT_JOBS_TENANTS' gave a single string: give a list of names instead."
            )
        collected = list(names)
        invalid = [n for n in collected if not is_valid_name(n)]
        if invalid:
            raise ConfigurationError(
                f"'TENANT_JOBS_TENANTS' holds invalid tenant names {invalid[:5]!r}: names are "
                "1-63 lower-case letters, digits and inner hyphens."
            )
        self._names = frozenset(collected)
        self._sorted = tuple(sorted(self._names))
