"""Releases of per-tenant slots, sent without waiting for Redis's answer.

The process running a capped task frees its slot when the task ends (see
:mod:`flask_tenant_jobs.limits`). Waiting for the answer would cost a round trip per
task, so the release goes out on a connection of its own and its answer is read
before the next release is sent (or by ``LEASES.settle()``).
"""

from __future__ import annotations

import logging
import threading
import typing as t

import redis

from . import scripts
from .transport import release_args, script

_log = logging.getLogger(__name__)
#: Releases sent whose answers have not come: past this, the next release waits for them.
_MOST_UNANSWERED = 64
#: Seconds to wait for the answer to a release before giving it up (its lease expires).
_ANSWER_WAIT = 10.0


class ReleaseOutbox:
    """Releases through one Redis client, sent on a connection of their own without
    waiting for each answer; the answers that have come are read at the next release."""

    def __init__(self, redis_client: t.Any) -> None:
        self._client = redis_client
        self._connection: t.Any = None
        #: ``(root, lease)`` of each release sent whose answer has not been read.
        self._unanswered: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def send(self, root: str, lease: str, ttl: float) -> None:
        """Send ``RELEASE`` of ``lease`` under the namespace key ``root``."""
        with self._lock:
            self._read_answers(ttl, wait=len(self._unanswered) >= _MOST_UNANSWERED)
            try:
                if self._connection is None:
                    self._connection = self._client.connection_pool.make_connection()
                # EVAL, not EVALSHA: a NOSCRIPT answer (Redis restarted, SCRIPT FLUSH) would be
                # read at the next release only, and the slot stay taken until then
                self._connection.send_command(
                    "EVAL", script(scripts.RELEASE).script, 1, root, *release_args(lease)
                )
            except (redis.ConnectionError, redis.TimeoutError):
                self._lost([*self._unanswered, (root, lease)], ttl)
            else:
                self._unanswered.append((root, lease))

    def answers(self, ttl: float) -> list[bool]:
        """Wait for the answers of the releases sent and not read yet, in order."""
        with self._lock:
            return self._read_answers(ttl, wait=True)

    def _read_answers(self, ttl: float, *, wait: bool) -> list[bool]:
        """The answers read (all of them, or, without ``wait``, those that have come)."""
        found = []
        while self._unanswered:
            try:
                if not self._connection.can_read(_ANSWER_WAIT if wait else 0):
                    if wait:  # no answer in time: give these up (their leases expire)
                        raise redis.TimeoutError("no answer to a release")
                    break
                found.append(self._next_answer(self._unanswered[0][1]))
            except (redis.ConnectionError, redis.TimeoutError):
                self._lost(self._unanswered, ttl)  # this one and those after it: unknown
                break
            del self._unanswered[0]
        return found

    def _next_answer(self, lease: str) -> bool:
        try:
            return bool(self._connection.read_response())
        except redis.ResponseError:  # not expected of the script: say so, carry on
            _log.exception("the release of a slot of %r failed", _limit_of(lease))
            return False

    def _lost(self, releases: list[tuple[str, str]], ttl: float) -> None:
        if self._connection is not None:
            self._connection.disconnect()
        self._connection = None
        self._unanswered = []
        for _, lease in releases:
            _log.warning(
                "could not release a slot of %r (Redis unreachable): it comes back when its "
                "lease expires, within TENANT_JOBS_SLOT_TTL (%g s)",
                _limit_of(lease),
                ttl,
            )


def _limit_of(lease: str) -> str:
    """The limit (``group\ntenant``) a lease counts against."""
    return lease.split("\r", 1)[0]
