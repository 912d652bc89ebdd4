"""A kombu Redis transport whose queues deliver tenant messages round-robin by tenant.

Publishing a message that names a tenant puts it in its tenant's lane and rings
the queue's doorbell (the Redis list kombu already ``BRPOP``s) with a token;
plain messages go to that list as before. While its queues are busy a worker
sends the ``TAKE`` script instead of ``BRPOP``: one round trip pops the doorbell
and, for a token, picks the oldest message of the next lane of the ring that no
limit holds back, taking a lease atomically when the task has a per-tenant
concurrency limit. When the doorbells run dry it blocks on ``BRPOP`` again and
runs the ``PICK`` script for the token that wakes it. Everything else (acks, the
visibility timeout, fanout, priorities) is kombu's own; restored messages go back
to the head of their lane.
"""

from __future__ import annotations

import logging
import threading
import time
import typing as t
import uuid
from datetime import datetime
from queue import Empty
from time import monotonic

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils import json as kombu_json
from kombu.utils.objects import cached_property
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from ..limits import LIMIT_HEADER
from ..registry import is_valid_name
from . import scripts

#: The header a delivered message carries when it took a lease:
#: ``group\ntenant\rtoken\rdoorbell``.
LEASE_HEADER = "tenant_jobs_lease"
_TOKEN = scripts.TOKEN.encode()
#: kombu is untyped: its Redis channel and transport, and its JSON, as ``Any``.
_RedisChannel: t.Any = kombu_redis.Channel
_RedisTransport: t.Any = kombu_redis.Transport
_RedisQoS: t.Any = kombu_redis.QoS
#: The shortest wait on the doorbells, in seconds.
MIN_WAIT = 0.01
#: How many doorbell items one ``TAKE`` pops at most (tokens parked on held lanes).
TAKE_BATCH = 100
_log = logging.getLogger(__name__)
dumps: t.Callable[[t.Any], str] = kombu_json.dumps
loads: t.Callable[[t.Any], t.Any] = kombu_json.loads


class HeldBack(t.NamedTuple):
    """A lane a limit held back at a pick: its tenant and the task at its head."""

    tenant: str
    task: str


class FairQoS(_RedisQoS):  # type: ignore[misc]
    """kombu's Redis acks; what a closing channel gives back, and what this worker
    rejects, frees its slots too."""

    def append(self, message: t.Any, delivery_tag: str) -> None:
        """Keep track of a delivered message; kombu's record of it in Redis is written
        here unless the script that took it wrote it in the same step."""
        if delivery_tag == self.channel.recorded_tag:
            kombu_virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        super().append(message, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """A message rejected here does not run here (again): free its slot now, not when
        its lease expires. Its task may have freed it already: that second release is
        fenced and frees nothing."""
        message = self._delivered.get(delivery_tag)
        super().reject(delivery_tag, requeue)
        self.channel.release_leases([message])

    def restore_unacked(self, client: t.Any = None) -> None:
        """Give back the messages delivered and not acked when the channel closes (a warm
        shutdown): none of them runs here, so the slots they took are freed at once."""
        if client is None and getattr(self.channel.connection, "client", None) is None:
            # Celery collects a lost connection before it closes the channel: kombu would
            # fail to make a client (and the worker stop); the messages stay in Redis's
            # unacked set, and come back after the visibility timeout.
            _log.warning(
                "the broker connection was lost: %d unacked message(s) come back after the "
                "visibility timeout", len(self._delivered)
            )
            return
        given_back = [message for tag, message in self._delivered.items()
                      if tag not in self._dirty]  # acked ones are running: not given back
        super().restore_unacked(client)
        self.channel.release_leases(given_back)


class FairChannel(_RedisChannel):  # type: ignore[misc]
    """A Redis channel with per-tenant lanes behind every queue."""

    QoS = FairQoS

    #: The message header naming the tenant (``TENANT_JOBS_HEADER``).
    tenant_header = "tenant_for_job"
    #: Seconds a lease lives unless renewed (``TENANT_JOBS_SLOT_TTL``).
    slot_ttl = 60.0
    #: Called with the lanes a pick held back (fires ``task_held_back``).
    on_held_back: t.Callable[[list[HeldBack]], None] | None = None

    from_transport_options = (
        *kombu_redis.Channel.from_transport_options, "tenant_header", "slot_ttl", "on_held_back"
    )

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_tick = 0.0
        self._renewer: threading.Thread | None = None
        #: Whether the doorbells had something at the last look: then ``TAKE``, not ``BRPOP``.
        self._busy = False
        #: The lease token of the ``TAKE`` in flight, ``None`` while a ``BRPOP`` is.
        self._take_token: str | None = None
        #: Whether a consumer of this channel takes messages without acks: kombu keeps
        #: no unacked record of those, so neither may the scripts.
        self._no_ack = False
        #: The delivery tag of the message being delivered, if its take recorded it.
        self.recorded_tag: str | None = None

    # -- publishing -------------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, t.Any], **kwargs: t.Any) -> None:
        """Put a tenant message in its lane (a plain one as kombu does)."""
        lane = self._lane_of(message)
        if lane is None:
            return super()._put(queue, message, **kwargs)  # type: ignore[no-any-return]
        kwargs.pop("_publish_batch", None)
        pri = self._get_message_priority(message, reverse=False)
        with self.conn_or_acquire() as client:
            delivery = message["properties"]["delivery_info"]
            item = _lane_item(message, delivery.get("exchange"), delivery.get("routing_key"))
            self._script(scripts.PUT)(
                keys=[self._root],
                args=[scripts.ROOT, self._q_for_pri(queue, pri), lane, item, _due(message), 0],
                client=client,
            )
        return None

    def _do_restore_message(
        self, payload: dict[str, t.Any], exchange: str, routing_key: str, pipe: t.Any,
        leftmost: bool = False,
    ) -> None:
        """Put a restored tenant message back at the head of its lane (kombu's restore
        puts it where it is consumed next; ``leftmost``, a requeue, at the end)."""
        lane = self._lane_of(payload)
        if lane is None:
            return super()._do_restore_message(  # type: ignore[no-any-return]
                payload, exchange, routing_key, pipe, leftmost
            )
        headers = payload.get("headers") or {}
        headers.pop(LEASE_HEADER, None)  # the slot is freed by whoever gives it back, or expires
        headers["redelivered"] = True
        payload.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
        pri = self._get_message_priority(payload, reverse=False)
        item = _lane_item(payload, exchange, routing_key)
        for queue in self._lookup(exchange, routing_key):
            self._script(scripts.PUT)(
                keys=[self._root],
                args=[scripts.ROOT, self._q_for_pri(queue, pri), lane, item, 0,
                      0 if leftmost else 1],
                client=pipe,
            )  # fmt: skip
        return None

    def _purge(self, queue: str) -> int:
        """``celery purge``, ``queue.purge()``: drop the tenant lanes too; return the count."""
        doorbells = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            return int(self._script(scripts.PURGE)(
                keys=[self._root], args=[scripts.ROOT, *doorbells], client=client
            ))  # fmt: skip

    def _lane_of(self, message: dict[str, t.Any]) -> str | None:
        """The lane of a message: its tenant, with its limit if it has one; ``None`` for
        a plain message (or one whose tenant header is not a tenant name)."""
        headers = message.get("headers")
        if not isinstance(headers, dict):
            return None
        tenant = headers.get(self.tenant_header)
        if not is_valid_name(tenant):
            return None
        limit = headers.get(LIMIT_HEADER)
        if not _is_limit(limit):
            return t.cast(str, tenant)
        return f"{tenant}\n{limit}"

    # -- consuming --------------------------------------------------------------------

    def basic_consume(self, queue: str, *args: t.Any, **kwargs: t.Any) -> t.Any:
        """kombu's; a consumer without acks turns off the scripts' unacked records."""
        if kwargs.get("no_ack", args[0] if args else False):
            self._no_ack = True
        return super().basic_consume(queue, *args, **kwargs)

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Run the periodic tick, then take the next message in one round trip while
        the queues are busy, or wait on the doorbells no longer than the tick asks."""
        wait = self._maybe_tick()
        if self._busy:
            return self._take_start()
        if wait is not None:  # at least 10 ms: Redis reads a shorter timeout as "forever"
            timeout = max(min(timeout or self.brpop_timeout, wait), MIN_WAIT)
        return super()._brpop_start(timeout)  # type: ignore[no-any-return]

    def _take_start(self) -> None:
        """Send ``TAKE`` over the doorbells in ``BRPOP``'s order, on the same connection,
        so that the reply comes back through the poller like a ``BRPOP`` one."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        doorbells = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._take_token = uuid.uuid4().hex
        command = ["EVALSHA", self._script(scripts.TAKE).sha, 1, self._root,
                   *self._take_args(self._take_token, doorbells)]  # fmt: skip
        if self.global_keyprefix:
            command = self.client._prefix_args(command)
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options: t.Any) -> bool:
        """The reply to ``TAKE`` or ``BRPOP``: deliver its message (a token's: the pick's)."""
        token, self._take_token = self._take_token, None
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "BRPOP" if token is None else "EVALSHA", **options
                )
            except NoScriptError:  # Redis restarted or flushed its scripts: load, then retry
                with self.conn_or_acquire() as client:
                    client.script_load(scripts.TAKE)
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            doorbell, message = (
                self._brpop_reply(reply) if token is None else self._take_reply(reply, token)
            )
            if message is None:
                raise Empty()
            queue = doorbell.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            self.connection._deliver(message, queue)
            return True
        finally:
            self.recorded_tag = None
            self._in_poll = None
            self._flush_brpop_reauth()

    def _brpop_reply(self, reply: t.Any) -> tuple[str, dict[str, t.Any] | None]:
        """A ``BRPOP`` reply: its doorbell and message (for a token, the pick's)."""
        if not reply:
            self._busy = False
            return "", None
        doorbell, item = _text(reply[0]), reply[1]
        message = self._pick(doorbell) if item == _TOKEN else loads(item)
        self._busy = message is not None
        return doorbell, message

    def _take_reply(self, reply: list[t.Any], token: str) -> tuple[str, dict[str, t.Any] | None]:
        """A ``TAKE`` reply: its doorbell and message; the doorbells' state for the next look."""
        status, doorbell, message = self._taken(reply, token)
        self._busy = status >= 0
        return doorbell, message

    def _get(self, queue: str) -> dict[str, t.Any]:
        """``basic_get``: the next message of ``queue``, by priority, picked fairly."""
        self._maybe_tick()
        doorbells = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        token = uuid.uuid4().hex
        with self.conn_or_acquire() as client:
            while True:
                reply = self._script(scripts.TAKE)(
                    keys=[self._root], args=self._take_args(token, doorbells, record=False),
                    client=client,
                )
                status, _, message = self._taken(reply, token)
                if message is not None:
                    return message
                if status < 0:
                    raise Empty()

    def _take_args(self, token: str, doorbells: list[str], record: bool = True) -> list[t.Any]:
        """The ``ARGV`` of ``TAKE`` over ``doorbells``, with lease ``token``; ``record``:
        the script writes kombu's unacked record of the message it takes."""
        return [scripts.ROOT, self.slot_ttl, token, TAKE_BATCH, *self._unacked_keys(record),
                *doorbells]  # fmt: skip

    def _unacked_keys(self, record: bool = True) -> tuple[str, str, str]:
        """kombu's unacked hash and index, for a script to record what it takes in, and
        the score kombu would give it (this host's clock, as ``restore_visible`` reads);
        empty names where kombu keeps no record (a consumer without acks, ``basic_get``,
        ``ack_emulation`` off)."""
        if not record or self._no_ack or not self.ack_emulation:
            return "", "", ""
        return self.unacked_key, self.unacked_index_key, repr(time.time())

    def _taken(self, reply: list[t.Any], token: str) -> tuple[int, str, dict[str, t.Any] | None]:
        """A ``TAKE`` reply as its status, doorbell and message (with the lease it took)."""
        status, doorbell, raw, limit, recorded, *held = reply
        doorbell = _text(doorbell)
        message = self._delivered(doorbell, raw, limit, recorded, held, token)
        return int(status), doorbell, message

    def _pick(self, doorbell: str) -> dict[str, t.Any] | None:
        """Run the pick for one token of ``doorbell``; the message, with its lease."""
        token = uuid.uuid4().hex
        with self.conn_or_acquire() as client:
            raw, limit, recorded, *held = self._script(scripts.PICK)(
                keys=[self._root],
                args=[scripts.ROOT, doorbell, self.slot_ttl, token, *self._unacked_keys()],
                client=client,
            )
        return self._delivered(doorbell, raw, limit, recorded, held, token)

    def _delivered(
        self, doorbell: str, raw: t.Any, limit: t.Any, recorded: t.Any, held: list[t.Any],
        token: str,
    ) -> dict[str, t.Any] | None:
        """The message a take or pick gave (or ``None``), with the lease it took; fires
        the held-back callback for the lanes it held back. One the script ``recorded`` as
        unacked is not recorded again (the record has no lease: a restore frees the slot
        from the message held here, or the lease expires)."""
        if held and self.on_held_back is not None:
            self.on_held_back(_held_back(held))
        if not raw:
            return None
        message = t.cast(dict[str, t.Any], loads(raw))
        if limit:
            lease = f"{_text(limit)}\r{token}\r{doorbell}"
            message.setdefault("headers", {})[LEASE_HEADER] = lease
            self._start_renewing()
        if recorded == 1:
            self.recorded_tag = message["properties"]["delivery_tag"]
        return message

    def _maybe_tick(self) -> float | None:
        """At most once a second (sooner when a held lane or a due message asks for
        it): move due messages, wake held lanes, give lost tokens back. Returns the
        seconds until the next tick is wanted."""
        now = monotonic()
        if now < self._next_tick or not self.active_queues:
            return max(self._next_tick - now, 0.0) or None
        doorbells = [self._q_for_pri(queue, pri)
                     for queue in self.active_queues for pri in self.priority_steps]  # fmt: skip
        with self.conn_or_acquire() as client:
            next_at = float(self._script(scripts.TICK)(
                keys=[self._root], args=[scripts.ROOT, scripts.TICK_BATCH, *doorbells],
                client=client,
            ))  # fmt: skip
            server_now = _server_time(client) if next_at else 0.0
        wait = float(self.brpop_timeout)
        if next_at:
            wait = min(wait, max(next_at - server_now, MIN_WAIT))
        self._next_tick = now + wait
        return wait

    def _start_renewing(self) -> None:
        """Start the thread (a greenlet under gevent) that renews the leases of the messages
        this channel holds unacked: prefetched ones waiting for a free pool slot, and
        ``acks_late`` ones. It runs whatever the consumer loop does meanwhile."""
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(
                target=self._renew_unacked, name="tenant-jobs-prefetched-leases", daemon=True
            )
            self._renewer.start()

    def _renew_unacked(self) -> None:
        while not self._closing:
            time.sleep(max(self.slot_ttl / 3, MIN_WAIT))
            leases = self._unacked_leases()
            if not leases:
                continue
            try:
                with self.conn_or_acquire() as client:
                    renew_leases(client, self._root, leases, self.slot_ttl)
            except Exception:  # Redis away for a moment: the next round tries again
                _log.warning("could not renew %d lease(s)", len(leases), exc_info=True)

    def release_leases(self, messages: t.Iterable[t.Any]) -> None:
        """Free the slots that delivered messages (kombu ``Message`` objects) took, if
        any; with Redis unreachable, the leases expire instead."""
        leases = [lease for message in messages if is_lease(lease := _lease_header(message))]
        if not leases:
            return
        try:
            with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
                for lease in leases:
                    self._release(lease, pipe)
                pipe.execute()
        except self.connection_errors:
            _log.warning(
                "could not release the slots of %d message(s) given back (Redis unreachable): "
                "they come back when their leases expire, within TENANT_JOBS_SLOT_TTL (%g s)",
                len(leases), self.slot_ttl,
            )  # fmt: skip

    def _release(self, lease: object, client: t.Any) -> None:
        """Run ``RELEASE`` for a well-formed lease (on a client or a pipeline)."""
        if is_lease(lease):
            self._script(scripts.RELEASE)(keys=[self._root], args=release_args(lease),
                                          client=client)  # fmt: skip

    def _unacked_leases(self) -> list[str]:
        """The leases of the messages delivered to this channel and not acked yet
        (prefetched, or running with ``acks_late``)."""
        delivered = list(self.qos._delivered.values())
        return [lease for message in delivered if is_lease(lease := _lease_header(message))]

    # -- helpers ------------------------------------------------------------------------

    @cached_property
    def _root(self) -> str:
        """The namespace key, with no prefix: kombu's prefixed client adds it."""
        return scripts.ROOT

    def _script(self, source: str) -> Script:
        """A registered script (one per source text per process)."""
        return script(source)


class FairTransport(_RedisTransport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`FairChannel`."""

    Channel = FairChannel
    driver_name = "redis"


_SCRIPTS: dict[str, Script] = {}


def script(source: str) -> Script:
    """The ``Script`` object of ``source``; it loads itself into Redis on first use."""
    found = _SCRIPTS.get(source)
    if found is None:
        found = _SCRIPTS[source] = Script(None, source.encode())  # type: ignore[arg-type]
    return found


def renew_leases(client: t.Any, root: str, leases: t.Iterable[str], ttl: float) -> None:
    """Push back the expiry of each live lease (``ZADD XX``: a freed lease stays freed)."""
    leases = list(leases)
    if not leases:
        return
    expiry = _server_time(client) + ttl
    with client.pipeline(transaction=False) as pipe:
        for lease in leases:
            limit, token, _ = lease.split("\r")
            pipe.zadd(f"{root}:lease:{limit}", {token: expiry}, xx=True)
        pipe.execute()


def is_lease(value: object) -> t.TypeGuard[str]:
    """Whether a ``tenant_jobs_lease`` header is well-formed: ``limit\rtoken\rdoorbell``."""
    return isinstance(value, str) and value.count("\r") == 2


def release_args(lease: str) -> list[str]:
    """The ``ARGV`` of ``RELEASE`` for a well-formed lease."""
    limit, token, doorbell = lease.split("\r")
    return [scripts.ROOT, limit, token, doorbell]


def _is_limit(value: object) -> t.TypeGuard[str]:
    """Whether a ``tenant_jobs_limit`` header is well-formed: ``key\nconcurrency\nrate``
    (a malformed one, which no sender of this library writes, leaves the task unlimited)."""
    if not isinstance(value, str) or "\r" in value or value.count("\n") != 2:
        return False
    key, concurrency, per_second = value.split("\n")
    try:
        return bool(key) and int(concurrency) >= 0 and 0 <= float(per_second) < float("inf")
    except ValueError:
        return False


def _lane_item(message: dict[str, t.Any], exchange: t.Any, routing_key: t.Any) -> str:
    """What a lane holds of ``message``: its delivery tag and the end of kombu's unacked
    record of it (``,"exchange","routing key"]``) before it, for the taking script."""
    body = dumps(message)
    tag = message.get("properties", {}).get("delivery_tag")
    if not isinstance(tag, str) or "\r" in tag or tag.startswith("{"):
        return body  # the take tells a message alone by its "{"
    return f"{tag}\r{dumps([exchange, routing_key])[1:]}\r{body}"


def _lease_header(message: t.Any) -> object:
    """The lease header of a delivered kombu ``Message`` (``None`` without one)."""
    headers = getattr(message, "headers", None)
    return headers.get(LEASE_HEADER) if isinstance(headers, dict) else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _server_time(client: t.Any) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1_000_000


def _due(message: dict[str, t.Any]) -> float:
    """The epoch seconds of a message's ``eta`` (0: none, or not readable)."""
    eta = (message.get("headers") or {}).get("eta")
    if not isinstance(eta, str):
        return 0.0
    try:
        return datetime.fromisoformat(eta).timestamp()
    except ValueError:
        return 0.0


def _held_back(reply: list[t.Any]) -> list[HeldBack]:
    """``[lane, head message, ...]`` from a pick, as tenants and task names."""
    found = []
    for lane, head in zip(reply[::2], reply[1::2], strict=False):
        tenant = _text(lane).split("\n", 1)[0]
        try:
            task = str(loads(head)["headers"]["task"])
        except (ValueError, KeyError, TypeError):
            task = ""
        found.append(HeldBack(tenant, task))
    return found
