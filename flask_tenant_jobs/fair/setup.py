"""How ``init_app`` turns fair dispatch on, and what workers and the CLI read of it.

With ``TENANT_JOBS_FAIR_DISPATCH`` on, the Celery app's ``broker_transport`` becomes
:class:`~flask_tenant_jobs.fair.transport.FairTransport` (the Redis URL stays as
it is); with it off, nothing of the broker is touched.
"""

from __future__ import annotations

import os
import typing as t
from collections import defaultdict
from urllib.parse import urlsplit

import redis
from celery import Celery, Task
from celery.signals import task_postrun, task_prerun
from flask import Flask

from .. import signals
from ..errors import ConfigurationError
from ..limits import LEASES
from ..sending import FAIR_TRANSPORT
from ..settings import Settings
from . import scripts
from .transport import LEASE_HEADER, FairChannel, HeldBack, is_lease, script

TRANSPORT = FAIR_TRANSPORT
REDIS_SCHEMES = ("redis", "rediss")
#: The pool processes' own Redis clients for leases: ``(pid, url) -> client``.
_CLIENTS: dict[tuple[int, str], redis.Redis] = {}


def install(app: Flask, celery_app: Celery | None, settings: Settings) -> None:
    """Select the fair transport for ``celery_app``; refuse a broker it cannot work on."""
    if not settings.fair_dispatch:
        return
    if celery_app is None:
        raise ConfigurationError(
            "'TENANT_JOBS_FAIR_DISPATCH' needs a Celery app: set app.config['CELERY'] with "
            "a Redis broker, e.g. {'broker_url': 'redis://127.0.0.1:6379/0'}."
        )
    _require_redis(celery_app)
    options = dict(celery_app.conf.broker_transport_options or {})
    options.update(
        tenant_header=settings.header,
        slot_ttl=settings.slot_ttl,
        on_held_back=lambda lanes: _send_held_back(app, lanes),
    )
    celery_app.conf.broker_transport = TRANSPORT
    celery_app.conf.broker_transport_options = options
    task_prerun.connect(_hold_lease)  # once per process: Celery's signals dedupe receivers
    task_postrun.connect(_release_lease)


def _require_redis(celery_app: Celery) -> None:
    """Fair dispatch keeps its lanes in Redis: refuse any other broker by name."""
    conf = celery_app.conf
    for setting in ("broker_url", "broker_read_url", "broker_write_url"):
        url = conf.get(setting)
        if url is None and setting != "broker_url":
            continue
        scheme = urlsplit(url).scheme if isinstance(url, str) else ""
        if scheme not in REDIS_SCHEMES:
            shown = f"{scheme}://" if scheme else repr(None if url is None else type(url).__name__)
            raise ConfigurationError(
                "'TENANT_JOBS_FAIR_DISPATCH' works with a Redis broker only ("
                f"'redis://...' or 'rediss://...'), but {setting} is {shown}: use Redis as "
                "the broker, or turn TENANT_JOBS_FAIR_DISPATCH off."
            )
    if conf.broker_transport not in (None, TRANSPORT, *REDIS_SCHEMES):
        raise ConfigurationError(
            "'TENANT_JOBS_FAIR_DISPATCH' works with a Redis broker only, but "
            f"broker_transport is {conf.broker_transport!r}: remove broker_transport (the "
            "Redis URL selects Redis), or turn TENANT_JOBS_FAIR_DISPATCH off."
        )


def is_fair(celery_app: Celery) -> bool:
    """Whether ``celery_app`` delivers through the fair transport."""
    return bool(celery_app.conf.broker_transport == TRANSPORT)


def _send_held_back(app: Flask, lanes: list[HeldBack]) -> None:
    """Fire ``task_held_back`` once per lane a pick held back."""
    if signals.task_held_back.receivers:
        for lane in lanes:
            signals.task_held_back.send(app, task=lane.task, tenant=lane.tenant)


# -- the worker: hold the lease while the task runs, release it after ---------------------


def _hold_lease(sender: Task | None = None, task: Task | None = None, **_: t.Any) -> None:
    """``task_prerun``: renew the lease the delivered message took, until the task ends."""
    task = task or sender
    lease = _lease_of(task)
    if task is None or lease is None:
        return
    client, root = _lease_client(task.app)
    ttl = float(task.app.conf.broker_transport_options.get("slot_ttl", FairChannel.slot_ttl))
    LEASES.hold(lease, client, root, ttl)


def _release_lease(sender: Task | None = None, task: Task | None = None, **_: t.Any) -> None:
    """``task_postrun`` (success, failure, retry, rejection): free the slot."""
    lease = _lease_of(task or sender)
    if lease is not None:
        LEASES.release(lease)


def _lease_of(task: Task | None) -> str | None:
    request = getattr(task, "request", None)
    lease = getattr(request, LEASE_HEADER, None)
    if lease is None:
        headers = getattr(request, "headers", None)
        lease = headers.get(LEASE_HEADER) if isinstance(headers, dict) else None
    return lease if is_lease(lease) else None


def _lease_client(celery_app: Celery) -> tuple[redis.Redis, str]:
    """This process's Redis client for leases, and the namespace key with kombu's prefix."""
    url = str(celery_app.conf.broker_url)
    key = (os.getpid(), url)
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS[key] = redis.Redis.from_url(url)
    prefix = str(celery_app.conf.broker_transport_options.get("global_keyprefix") or "")
    return client, prefix + scripts.ROOT


# -- what is waiting ------------------------------------------------------------------------


class QueueRow(t.NamedTuple):
    """One tenant's line of ``flask tenant-jobs queues``."""

    tenant: str
    waiting: int
    held_back: int
    scheduled: int
    running: int


def queue_rows(celery_app: Celery, queue: str | None = None) -> list[QueueRow]:
    """Per tenant: tasks ready, held back by a limit, not due yet, and running under a
    limit (live leases), for ``queue`` (default: Celery's default queue)."""
    if not is_fair(celery_app):
        raise ConfigurationError(
            "Tenant queues exist only with fair dispatch: set 'TENANT_JOBS_FAIR_DISPATCH' "
            "to True (Redis broker)."
        )
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    with celery_app.connection_for_read() as connection:
        channel = t.cast(FairChannel, connection.default_channel)
        name = queue or celery_app.conf.task_default_queue
        doorbells = [channel._q_for_pri(name, pri) for pri in channel.priority_steps]
        with channel.conn_or_acquire() as client:
            backlog = script(scripts.BACKLOG)(
                keys=[scripts.ROOT], args=[scripts.ROOT, *doorbells], client=client
            )
            running = script(scripts.RUNNING)(
                keys=[scripts.ROOT], args=[scripts.ROOT], client=client
            )
    for lane, size, kind in zip(backlog[::3], backlog[1::3], backlog[2::3], strict=False):
        counts[_tenant_of(lane)][int(kind)] += int(size)
    for limit, live in zip(running[::2], running[1::2], strict=False):
        tenant = limit.decode().split("\n")[1]
        counts[tenant][3] += int(live)
    return [QueueRow(tenant, *counts[tenant]) for tenant in sorted(counts)]


def backlog(celery_app: Celery, queue: str | None = None) -> dict[str, int]:
    """Tasks waiting in ``queue``, per tenant (ready, held back and not due yet)."""
    return {
        row.tenant: row.waiting + row.held_back + row.scheduled
        for row in queue_rows(celery_app, queue)
        if row.waiting + row.held_back + row.scheduled
    }


def _tenant_of(lane: bytes) -> str:
    return lane.decode().split("\n", 1)[0]
