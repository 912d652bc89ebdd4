"""Per-tenant limits of tenant tasks: their options, and the leases a worker holds.

``@tenant_task(tenant_concurrency=N)`` runs at most ``N`` executions of a task at
once per tenant, ``@tenant_task(tenant_rate_limit="20/s")`` starts at most that many
per tenant (Celery's rate syntax), across every worker on the broker. Tasks that
name the same ``tenant_limit_key`` share one limit. The fair-dispatch transport
admits a message only when its tenant has room, and records a lease (a token in a
sorted set, scored by its expiry) in the same atomic step; the lease travels in
the delivered message. The process running the task renews it every
``TENANT_JOBS_SLOT_TTL / 3`` seconds and releases it, fenced by its own token, when
the task ends, so a killed worker's slot comes back within the TTL and a late or
double release frees nothing else.
"""

from __future__ import annotations

import logging
import os
import threading
import typing as t
from dataclasses import dataclass

from celery.utils.time import rate

from .errors import ConfigurationError

if t.TYPE_CHECKING:
    from .fair.outbox import ReleaseOutbox

_log = logging.getLogger(__name__)
#: The message header naming a task's limit (see :attr:`Limit.header`).
LIMIT_HEADER = "tenant_jobs_limit"
#: The options ``tenant_task`` accepts for limits.
LIMIT_OPTIONS = ("tenant_concurrency", "tenant_rate_limit", "tenant_limit_key")
RATE_ACCEPTED = "Celery's rate syntax: a number of tasks per second, or e.g. '20/s', '100/m', '5/h'"


@dataclass(frozen=True)
class Limit:
    """A task's per-tenant limits: the key they are counted under, the most executions
    at once (0: no such limit) and the most starts per second (0: no such limit)."""

    key: str
    concurrency: int
    per_second: float

    @property
    def header(self) -> str:
        """The ``tenant_jobs_limit`` message header: ``key\\nconcurrency\\nper_second``."""
        return f"{self.key}\n{self.concurrency}\n{self.per_second!r}"


def check_options(options: t.Mapping[str, t.Any]) -> None:
    """Refuse malformed limit options of ``@tenant_task(...)`` at decoration time."""
    concurrency = options.get("tenant_concurrency")
    if concurrency is not None:
        check_concurrency(concurrency)
    limit_rate = options.get("tenant_rate_limit")
    if limit_rate is not None:
        per_second(limit_rate)
    key = options.get("tenant_limit_key")
    if key is not None:
        check_key(key)
        if concurrency is None and limit_rate is None:
            raise ConfigurationError(
                f"tenant_task(tenant_limit_key={key!r}) shares a limit, but the task sets "
                "none: add tenant_concurrency=N and/or tenant_rate_limit='20/s'."
            )


def check_concurrency(value: object) -> int:
    """A whole number of executions at once, 1 or more."""
    if type(value) is not int or value < 1:
        raise ConfigurationError(
            f"tenant_task(tenant_concurrency={value!r}): use a whole number, 1 or more (the "
            "most executions of the task running at once for one tenant)."
        )
    return value


def per_second(value: object) -> float:
    """A rate in Celery's syntax, as tasks per second (more than 0)."""
    try:
        found = float(rate(value)) if isinstance(value, (str, int, float)) else 0.0
    except (ValueError, KeyError, TypeError):
        found = 0.0
    if isinstance(value, bool) or not found > 0:
        raise ConfigurationError(
            f"tenant_task(tenant_rate_limit={value!r}): use {RATE_ACCEPTED}, more than 0."
        )
    return found


def check_key(value: object) -> str:
    """A limit key: a non-empty string without line breaks."""
    if not isinstance(value, str) or not value or any(c in value for c in "\r\n"):
        raise ConfigurationError(
            f"tenant_task(tenant_limit_key={value!r}): use a non-empty string without line "
            "breaks, e.g. 'billing-api'; tasks with the same key share one limit."
        )
    return value


def limit_of(task: t.Any) -> Limit | None:
    """The per-tenant limits of a task (``None``: it has none)."""
    concurrency = getattr(task, "tenant_concurrency", None)
    limit_rate = getattr(task, "tenant_rate_limit", None)
    if concurrency is None and limit_rate is None:
        return None
    key = getattr(task, "tenant_limit_key", None) or task.name
    return Limit(
        key=check_key(key),
        concurrency=0 if concurrency is None else check_concurrency(concurrency),
        per_second=0.0 if limit_rate is None else per_second(limit_rate),
    )


class Leases:
    """The leases held by the tasks running in this process, renewed by one thread."""

    def __init__(self) -> None:
        self._held: dict[str, t.Any] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._outboxes: dict[tuple[int, int], ReleaseOutbox] = {}
        self.ttl = 60.0

    def hold(self, lease: str, redis_client: t.Any, root: str, ttl: float) -> None:
        """Renew ``lease`` every ``ttl / 3`` seconds until :meth:`release`."""
        with self._lock:
            self.ttl = ttl
            self._held[lease] = (redis_client, root)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._renew_forever, name="tenant-jobs-leases", daemon=True
                )
                self._thread.start()

    def release(self, lease: str) -> bool:
        """Free the slot of ``lease`` if it is still live (fenced); wake held-back work.

        The release is sent before this returns, but its answer is not waited for (one
        round trip less per task): :meth:`settle` reads the answers. ``False``: this
        process does not hold ``lease`` (released already). With Redis unreachable, the
        lease is no longer renewed and expires instead."""
        with self._lock:
            found = self._held.pop(lease, None)
        if found is None:
            return False
        redis_client, root = found
        self._outbox(redis_client).send(root, lease, self.ttl)
        return True

    def settle(self) -> list[bool]:
        """Wait for the answers of the releases this process sent: whether each freed a
        slot (``False``: its lease had expired and the slot was gone already)."""
        with self._lock:
            outboxes = [box for (pid, _), box in self._outboxes.items() if pid == os.getpid()]
        return [answer for box in outboxes for answer in box.answers(self.ttl)]

    def _outbox(self, redis_client: t.Any) -> ReleaseOutbox:
        from .fair.outbox import ReleaseOutbox  # leases exist only with fair dispatch

        key = (os.getpid(), id(redis_client))
        with self._lock:
            box = self._outboxes.get(key)
            if box is None:
                box = self._outboxes[key] = ReleaseOutbox(redis_client)
            return box

    def held(self) -> list[str]:
        """The leases this process holds now."""
        with self._lock:
            return list(self._held)

    def _renew_forever(self) -> None:
        from .fair.transport import renew_leases

        while True:
            self._wake.wait(max(self.ttl / 3, 0.5))
            with self._lock:
                by_client: dict[int, tuple[t.Any, str, list[str]]] = {}
                for lease, (redis_client, root) in self._held.items():
                    by_client.setdefault(id(redis_client), (redis_client, root, []))[2].append(
                        lease
                    )
            for redis_client, root, leases in by_client.values():
                try:
                    renew_leases(redis_client, root, leases, self.ttl)
                except Exception:  # Redis away for a moment: the next round tries again
                    _log.warning("could not renew %d lease(s); trying again", len(leases),
                                 exc_info=True)  # fmt: skip


#: The leases of this process.
LEASES = Leases()
