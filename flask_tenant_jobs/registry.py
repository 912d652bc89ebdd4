"""Where tenant names come from: validation and a time-bounded cache.

The source is ``TENANT_JOBS_TENANTS``: a list, or a zero-argument callable
(for example one that reads a ``tenants`` table). The callable runs at most
once per ``TENANT_JOBS_CACHE_SECONDS``, so resolving a known tenant in a
request or a worker costs no SQL.

A callable that fails (raises, or returns no list) is not called again before
the next cache period, and the last good list is served meanwhile, for at most
``TENANT_JOBS_STALE_SECONDS`` after it was read; with no such list, lookups
raise ``TenantSourceError``. Malformed names from a callable are skipped.
Each failure and each skipped name is logged once per read.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import re
import threading
import time
import typing as t

from .errors import (
    ConfigurationError,
    InvalidTenantNameError,
    TenantNotFoundError,
    TenantSourceError,
)

logger = logging.getLogger(__name__)
#: How many skipped names a warning shows.
SHOWN_NAMES = 10
#: A counter shared with the processes this one forks (a prefork worker's pool):
#: raising it makes every registry in all of them read its source again.
_refreshes: ctypes.c_ulonglong | None = None

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
    """All tenant names of one app, cached for ``cache_seconds``.

    A failing callable is called again only after ``cache_seconds``; the last
    good names are served for at most ``stale_seconds`` after they were read.
    """

    def __init__(
        self,
        source: t.Iterable[str] | t.Callable[[], t.Iterable[str]],
        cache_seconds: float,
        stale_seconds: float = 600.0,
    ) -> None:
        self._source = source
        self._cache_seconds = cache_seconds
        self._stale_seconds = stale_seconds
        self._names: frozenset[str] = frozenset()
        self._sorted: tuple[str, ...] = ()
        self._expires = -1.0
        self._loaded_at = -float("inf")
        self._attempted_at = -float("inf")
        self._failure: TenantSourceError | None = None
        self._lock = threading.Lock()
        self._static = not callable(source)
        if self._static:
            self._store(_static_names(t.cast(t.Iterable[str], source)))
            self._expires = float("inf")
        self._refreshes_seen = _shared_refreshes().value

    def names(self) -> tuple[str, ...]:
        """All tenant names, sorted."""
        self._refresh_if_stale()
        return self._sorted

    def exists(self, name: object) -> bool:
        """Return whether ``name`` is a known tenant; malformed names are never looked up."""
        if type(name) is str and name in self._names and self._is_fresh():
            return True  # the fast path: only valid names are ever stored
        if not is_valid_name(name):
            return False
        self._refresh_if_stale()
        return name in self._names

    def require(self, name: object) -> str:
        """Return ``name`` if it is a known tenant, else raise the error that says why."""
        if self.exists(name):  # its fast path first: a known name is valid
            return t.cast(str, name)
        raise TenantNotFoundError(validate_name(name))

    def invalidate(self, older_than: float = 0.0) -> bool:
        """Forget the cached names so the next lookup reads the source again.

        With ``older_than``, only names read longer ago than that many seconds are
        forgotten, which bounds how often misses can make the source be read; while
        the source is failing, that is at most once per ``cache_seconds`` anyway.
        Returns whether they were forgotten.
        """
        if self._static:
            return False
        if older_than and self._failure_is_recent():
            older_than = max(older_than, self._cache_seconds)
        if time.monotonic() - self._attempted_at < older_than:
            return False
        self._expires = -1.0
        return True

    def _is_fresh(self) -> bool:
        if self._static:  # a list in the configuration never goes stale
            return True
        return (
            time.monotonic() < self._expires
            and t.cast(ctypes.c_ulonglong, _refreshes).value == self._refreshes_seen
        )

    def _failure_is_recent(self) -> bool:
        return self._attempted_at > self._loaded_at

    def _refresh_if_stale(self) -> None:
        if not self._is_fresh():
            with self._lock:
                if not self._is_fresh():
                    self._read_source()
        if self._failure is not None:
            raise self._failure

    def _read_source(self) -> None:
        """Call the source once; on failure keep the last good names while they may serve.

        The names are stored before they are marked fresh: other threads read them
        without the lock.
        """
        now = time.monotonic()
        self._attempted_at = now
        refreshes = _shared_refreshes().value
        try:
            names = _callable_names(t.cast(t.Callable[[], t.Iterable[str]], self._source)())
        except Exception as error:
            self._keep_last_good_names(now, error)
        else:
            self._store(names)
            self._loaded_at = now
            self._failure = None
        self._refreshes_seen = refreshes
        self._expires = now + self._cache_seconds

    def _keep_last_good_names(self, now: float, error: Exception) -> None:
        """After a failed read: serve the last good names if they are recent enough."""
        age = now - self._loaded_at
        if age <= self._stale_seconds:
            logger.warning(
                "The tenant source 'TENANT_JOBS_TENANTS' failed (%r); serving the %d tenant "
                "names read %.0f s ago, trying again in %.0f s.",
                error, len(self._names), age, self._cache_seconds,
            )
            return
        self._names, self._sorted = frozenset(), ()
        self._failure = TenantSourceError(repr(error), self._stale_seconds)
        logger.error(
            "The tenant source 'TENANT_JOBS_TENANTS' failed (%r) and no tenant list read "
            "in the last %.0f s is left: every tenant lookup fails until it works again "
            "(tried again in %.0f s).",
            error, self._stale_seconds, self._cache_seconds,
            exc_info=error,
        )

    def _store(self, names: t.Iterable[str]) -> None:
        self._names = frozenset(names)
        self._sorted = tuple(sorted(self._names))


def refresh_everywhere() -> None:
    """Make every registry in this process, and in the processes it forked, read its
    source again at its next lookup."""
    _shared_refreshes().value += 1


def _shared_refreshes() -> ctypes.c_ulonglong:
    """The refresh counter (shared memory), made when the first registry is, so before a
    worker forks its pool; reading it takes no lock."""
    global _refreshes
    if _refreshes is None:
        _refreshes = multiprocessing.RawValue(ctypes.c_ulonglong, 0)
    return _refreshes


def _static_names(names: t.Iterable[str]) -> list[str]:
    """A configured list of names, all valid, else ``ConfigurationError``."""
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
    return collected


def _callable_names(names: t.Iterable[str]) -> list[str]:
    """What a source callable returned, without the malformed names (logged)."""
    if isinstance(names, (str, bytes)) or not isinstance(names, t.Iterable):
        raise ConfigurationError(
            f"'TENANT_JOBS_TENANTS' returned {type(names).__name__!r}, not a list of names."
        )
    collected = list(names)
    valid = [name for name in collected if is_valid_name(name)]
    if len(valid) < len(collected):
        invalid = [name for name in collected if not is_valid_name(name)]
        logger.warning(
            "The tenant source 'TENANT_JOBS_TENANTS' returned %d invalid tenant name(s), "
            "skipped: %s. Names are 1-63 lower-case letters, digits and inner hyphens.",
            len(invalid), ", ".join(repr(name)[:80] for name in invalid[:SHOWN_NAMES]),
        )
    return valid
