"""The example's embedded broker: kombu's SQLAlchemy transport on a SQLite file.

It needs no service and works across processes (``flask --app example_app run``
and ``flask --app example_app tenant-jobs worker`` share the files in the
instance folder). Each message is one row, written in one transaction and taken
under SQLite's write lock, so a worker never reads half a message (kombu's
filesystem transport can hand a reader a file before its writer filled it).
Results go to a second SQLite file through Celery's database backend.

Messages a worker took stay in the table as delivered rows, and results stay
until they expire; a worker deletes both when it starts. The demo empties the
queue and the results before and after it runs. For development only: a worker
killed with SIGKILL loses the message it was running, unlike Redis or RabbitMQ
with ``acks_late``.
"""

from __future__ import annotations

import os
import typing as t

from celery import Celery
from celery.signals import worker_ready
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy.pool import NullPool

TRANSPORT = "example_app.broker:EmbeddedTransport"


class EmbeddedTransport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport, looking for new messages every 50 ms (kombu: 1 s)."""

    polling_interval = 0.05

    def drain_events(self, connection: t.Any, timeout: t.Any = None) -> t.Any:  # type: ignore[override]
        """Give up waiting for a message after 0.1 s at most (``socket.timeout``).

        Celery's worker loop waits 2 s per call and checks for shutdown between
        calls; this way a stopping worker (Ctrl-C, the demo's worker) stops at once.
        """
        shorter = None if timeout is None else min(timeout, 0.1)
        return super().drain_events(connection, timeout=shorter)  # type: ignore[no-untyped-call]


def embedded_config(instance_path: str) -> dict[str, t.Any]:
    """Celery settings for the broker and results in ``instance_path``."""
    os.makedirs(instance_path, exist_ok=True)
    broker = os.path.join(instance_path, "celery-broker.sqlite3")
    results = os.path.join(instance_path, "celery-results.sqlite3")
    return {
        "broker_url": f"sqlite:///{broker}",
        "broker_transport": TRANSPORT,
        # No pooled SQLite connection outlives a transaction, so none is carried into
        # a forked pool process; wait up to 30 s for the write lock.
        "broker_transport_options": {"poolclass": NullPool, "connect_args": {"timeout": 30}},
        "result_backend": f"db+sqlite:///{results}",
        "worker_prefetch_multiplier": 1,
        # The worker's timer (countdown/eta tasks) looks again every 0.1 s, not 1 s, so
        # that it stops at once too.
        "worker_timer_precision": 0.1,
    }


def is_embedded(celery_app: Celery) -> bool:
    """Whether ``celery_app`` uses the embedded broker (never clean up a real broker)."""
    return bool(celery_app.conf.broker_transport == TRANSPORT)


def empty(celery_app: Celery) -> None:
    """Delete every message and every result of the embedded broker."""
    celery_app.control.purge()
    _delete_results(celery_app, expired_only=False)


def leftovers(celery_app: Celery) -> dict[str, int]:
    """What the embedded broker holds: messages waiting, messages delivered, results."""
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        message = channel.message_cls
        messages = channel.session.query(message)
        waiting = messages.filter(message.visible.is_(True)).count()
        delivered = messages.filter(message.visible.is_(False)).count()
        channel.session.commit()
    session = celery_app.backend.ResultSession()
    try:
        results = session.query(celery_app.backend.task_cls).count()
    finally:
        session.close()
    return {"waiting": waiting, "delivered": delivered, "results": results}


def clean_up(celery_app: Celery) -> None:
    """Delete the delivered messages and the expired results (a worker does it as it starts)."""
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        message = channel.message_cls
        channel.session.query(message).filter(message.visible.is_(False)).delete()
        channel.session.commit()
    _delete_results(celery_app, expired_only=True)


def _delete_results(celery_app: Celery, expired_only: bool) -> None:
    backend = celery_app.backend
    if expired_only:
        backend.cleanup()
        return
    session = backend.ResultSession()
    try:
        session.query(backend.task_cls).delete()
        session.query(backend.taskset_cls).delete()
        session.commit()
    finally:
        session.close()


def _clean_up_when_a_worker_starts(sender: t.Any = None, **_: t.Any) -> None:
    celery_app = getattr(sender, "app", None)
    if celery_app is not None and is_embedded(celery_app):
        clean_up(celery_app)


worker_ready.connect(_clean_up_when_a_worker_starts)
