"""Fair dispatch and per-tenant limits, on a real Redis with real worker subprocesses.

Workers are ``flask --app tests.fair_app:create_app() tenant-jobs worker`` subprocesses
(``TENANT_JOBS_FAIR_DISPATCH`` on); the tasks append what they did to a Redis list,
which the tests read. Redis database ``TEST_FAIR_REDIS_DB`` (default 8) is flushed
and used. The first tests need no services: bad input is refused at decoration or
``init_app`` time.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import typing as t
import uuid
from collections import Counter
from pathlib import Path
from queue import Empty

import pytest
from celery import chain, chord, group
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import ConfigurationError, TenantJobs, signals, tenant_task
from flask_tenant_jobs.fair import scripts
from flask_tenant_jobs.fair.setup import TRANSPORT
from flask_tenant_jobs.fair.transport import LEASE_HEADER, FairChannel
from flask_tenant_jobs.limits import LEASES
from tests import fair_app
from tests.worker_processes import (
    RedisServer,
    Worker,
    redis_db_url,
    subprocess_env,
    wait_until,
)

FAIR_DB = int(os.environ.get("TEST_FAIR_REDIS_DB", "8"))
APP = "tests.fair_app:create_app()"
TIMEOUT = 60.0


def _app(celery: dict[str, t.Any] | None, **config: t.Any) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test", SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=["acme"], **config,
    )  # fmt: skip
    if celery is not None:
        app.config["CELERY"] = celery
    db = SQLAlchemy()
    db.init_app(app)
    TenantJobs(app, db=db)
    return app


# -- bad input: refused up front, saying what is accepted --------------------------------------


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True, None.__class__])
def test_tenant_concurrency_must_be_a_whole_number_of_one_or_more(value: object) -> None:
    with pytest.raises(ConfigurationError, match="whole number, 1 or more"):
        tenant_task(tenant_concurrency=value)(lambda: None)


@pytest.mark.parametrize("value", ["ten per second", "20/x", "0/s", "-1/s", 0, True, [20]])
def test_tenant_rate_limit_must_be_a_celery_rate(value: object) -> None:
    with pytest.raises(ConfigurationError, match="Celery's rate syntax"):
        tenant_task(tenant_rate_limit=value)(lambda: None)


def test_a_limit_key_needs_a_limit_and_no_line_breaks() -> None:
    with pytest.raises(ConfigurationError, match="sets none"):
        tenant_task(tenant_limit_key="billing-api")(lambda: None)
    with pytest.raises(ConfigurationError, match="without line breaks"):
        tenant_task(tenant_limit_key="a\nb", tenant_concurrency=1)(lambda: None)


@pytest.mark.parametrize("value", [0, -5, "60", True])
def test_slot_ttl_must_be_positive_seconds(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"TENANT_JOBS_SLOT_TTL.*more than 0"):
        _app({"broker_url": "redis://127.0.0.1:1/0"}, TENANT_JOBS_SLOT_TTL=value)


@pytest.mark.parametrize(
    "broker", ["amqp://guest:secret@127.0.0.1:5672/x", "memory://", "filesystem://", None]
)
def test_fair_dispatch_refuses_brokers_other_than_redis(broker: str | None) -> None:
    with pytest.raises(ConfigurationError, match="works with a Redis broker only") as error:
        _app({"broker_url": broker}, TENANT_JOBS_FAIR_DISPATCH=True)
    assert "secret" not in str(error.value) and "broker_url is" in str(error.value)
    celery = {"broker_url": "redis://127.0.0.1:1/0", "broker_read_url": broker or "memory://"}
    with pytest.raises(ConfigurationError, match="broker_read_url is"):
        _app(celery, TENANT_JOBS_FAIR_DISPATCH=True)


def test_fair_dispatch_refuses_another_broker_transport_and_no_celery() -> None:
    celery = {"broker_url": "redis://127.0.0.1:1/0", "broker_transport": "sqs"}
    with pytest.raises(ConfigurationError, match="broker_transport is 'sqs'"):
        _app(celery, TENANT_JOBS_FAIR_DISPATCH=True)
    with pytest.raises(ConfigurationError, match="needs a Celery app"):
        _app(None, TENANT_JOBS_FAIR_DISPATCH=True)


def test_with_fair_dispatch_off_the_broker_is_untouched() -> None:
    options = {"visibility_timeout": 7}
    app = _app({"broker_url": "redis://127.0.0.1:1/0", "broker_transport_options": options})
    conf = app.extensions["tenant_jobs"].celery.conf
    assert conf.broker_transport is None
    assert conf.broker_transport_options == {"visibility_timeout": 7}
    on = _app({"broker_url": "redis://127.0.0.1:1/0"}, TENANT_JOBS_FAIR_DISPATCH=True)
    assert on.extensions["tenant_jobs"].celery.conf.broker_transport == TRANSPORT


@tenant_task(tenant_concurrency=1, tenant_rate_limit="1/h")
def limited_noop() -> str:
    return "ran"


def test_a_limited_task_is_refused_without_fair_dispatch_and_runs_eagerly() -> None:
    app = _app({"broker_url": "redis://127.0.0.1:1/0"})
    extension = app.extensions["tenant_jobs"]
    with app.app_context(), extension.switch("acme"):
        with pytest.raises(ConfigurationError, match="TENANT_JOBS_FAIR_DISPATCH = True"):
            limited_noop.delay()
        assert [limited_noop.apply().get() for _ in range(3)] == ["ran"] * 3  # no limits
    eager = _app({"broker_url": "redis://127.0.0.1:1/0", "task_always_eager": True})
    with eager.app_context(), eager.extensions["tenant_jobs"].switch("acme"):
        assert [limited_noop.delay().get() for _ in range(3)] == ["ran"] * 3


def test_backlog_needs_fair_dispatch() -> None:
    app = _app({"broker_url": "redis://127.0.0.1:1/0"})
    with app.app_context(), pytest.raises(ConfigurationError, match="TENANT_JOBS_FAIR_DISPATCH"):
        app.extensions["tenant_jobs"].backlog()


# -- real Redis -------------------------------------------------------------------------------


class Fair:
    """A flushed Redis database, the test-side app, and worker subprocesses on it."""

    def __init__(
        self, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_url: str = ""
    ) -> None:
        import redis

        self.url = url
        self.log_url = log_url
        self.queue = f"fair-{uuid.uuid4().hex[:8]}"
        self.tmp_path = tmp_path
        self.redis = redis.Redis.from_url(url)
        self.redis.flushdb()
        self.log_redis = redis.Redis.from_url(log_url) if log_url else self.redis
        self.log_redis.delete(fair_app.LOG)
        monkeypatch.setenv("FAIR_BROKER_URL", url)
        monkeypatch.setenv("FAIR_LOG_URL", log_url)
        monkeypatch.setenv("FAIR_QUEUE", self.queue)
        self.app = fair_app.create_app()
        self.extension = fair_app.tenant_jobs
        self.celery = self.app.extensions["celery"]
        self.workers: list[Worker] = []

    def worker(self, pool: str = "solo", concurrency: int = 1, **env: str) -> Worker:
        environment = subprocess_env(
            "FAIR_", FAIR_BROKER_URL=self.url, FAIR_LOG_URL=self.log_url, FAIR_QUEUE=self.queue,
            **env,
        )
        log = self.tmp_path / f"worker-{len(self.workers)}.log"
        worker = Worker(APP, pool, concurrency, environment, log)
        self.workers.append(worker)
        worker.wait_ready(self.celery)
        return worker

    def send(self, task: t.Any, tenant: str | None, *args: t.Any, **options: t.Any) -> t.Any:
        with self.app.app_context():
            if tenant is None:
                return task.apply_async(args, **options)
            with self.extension.switch(tenant):
                return task.apply_async(args, **options)

    def log(self) -> list[dict[str, t.Any]]:
        return [json.loads(line) for line in self.log_redis.lrange(fair_app.LOG, 0, -1)]

    def finished(self) -> list[dict[str, t.Any]]:
        return [line for line in self.log() if not line["label"].startswith("started:")]

    def wait_for(self, count: int, timeout: float = TIMEOUT) -> list[dict[str, t.Any]]:
        wait_until(lambda: len(self.finished()) >= count, timeout,
                   f"{count} tasks finished", self.details)  # fmt: skip
        return self.finished()

    def details(self) -> str:
        return "\n".join(w.log() for w in self.workers) + f"\nlog: {self.log()}"

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def fair(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> t.Iterator[Fair]:
    setup = Fair(redis_db_url(redis_url, FAIR_DB), tmp_path, monkeypatch)
    try:
        yield setup
    finally:
        setup.stop()


def _with_workers(test: t.Callable[..., None]) -> t.Callable[..., None]:
    return pytest.mark.slow(pytest.mark.redis(test))


def _max_overlap(lines: list[dict[str, t.Any]]) -> int:
    """The most executions running at once among ``lines`` (start/end intervals)."""
    edges = sorted([(line["start"], 1) for line in lines] + [(line["end"], -1) for line in lines])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


@_with_workers
def test_round_robin_over_tenants_and_fifo_within_each(fair: Fair) -> None:
    """A single-slot worker meets a backlog: one task per waiting tenant in turn."""
    for i in range(6):
        fair.send(fair_app.record, "acme", f"acme-{i}")
    for i in range(3):
        fair.send(fair_app.record, "globex", f"globex-{i}")
    for i in range(2):
        fair.send(fair_app.record, "initech", f"initech-{i}")
    fair.send(fair_app.plain, None, "plain")
    with fair.app.app_context():
        assert fair.extension.backlog() == {"acme": 6, "globex": 3, "initech": 2}
        assert fair.extension.backlog("no-such-queue") == {}
    fair.worker("solo")
    done = fair.wait_for(12)
    assert [line["label"] for line in done] == [
        "acme-0", "globex-0", "initech-0", "acme-1", "globex-1", "initech-1",
        "acme-2", "globex-2", "acme-3", "acme-4", "acme-5", "plain",
    ]  # fmt: skip
    assert all(line["label"].startswith(line["tenant"] or "plain") for line in done)
    with fair.app.app_context():
        assert fair.extension.backlog() == {}


@_with_workers
def test_eta_retries_chains_chords_and_beat_on_threads(fair: Fair, tmp_path: Path) -> None:
    from tests.worker_processes import FlaskProcess

    fair.worker("threads", 4)
    sent = time.time()
    fair.send(fair_app.record, "globex", "later", countdown=1.5)
    with fair.app.app_context():
        assert fair.extension.backlog() == {"globex": 1}
        rows = {row.tenant: row for row in fair.extension.queue_rows()}
        assert rows["globex"].scheduled == 1
    fair.send(fair_app.flaky, "acme", "flaky")
    with fair.app.app_context(), fair.extension.switch("initech"):
        chain(fair_app.record.si("chain-1"), fair_app.record.si("chain-2")).delay()
        chord(group(fair_app.record.s(f"head-{i}") for i in range(3)),
              fair_app.total.s("body")).delay()  # fmt: skip
    fair.send(fair_app.plain, None, "plain")
    done = {line["label"]: line for line in fair.wait_for(9)}
    assert done["later"]["start"] >= sent + 1.5 - 0.05 and done["later"]["tenant"] == "globex"
    assert done["flaky"]["tenant"] == "acme" and done["flaky"]["retries"] == 1
    assert {done[k]["tenant"] for k in ("chain-1", "chain-2", "body")} == {"initech"}
    assert done["body"]["count"] == 3 and done["plain"]["tenant"] is None
    beat = FlaskProcess(APP, ["beat", "-s", str(tmp_path / "schedule"), "--max-interval", "1"],
                        subprocess_env("FAIR_", FAIR_BROKER_URL=fair.url, FAIR_QUEUE=fair.queue),
                        tmp_path / "beat.log")  # fmt: skip
    try:
        wait_until(lambda: {line["tenant"] for line in fair.log() if line["label"] == "beat"}
                   >= set(fair_app.TENANTS), TIMEOUT, "a beat entry ran in every tenant",
                   lambda: beat.log() + fair.details())  # fmt: skip
    finally:
        beat.stop()


@_with_workers
@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_pools_deliver_every_tenant_task_in_its_tenant(fair: Fair, pool: str) -> None:
    fair.worker(pool, 3)
    for i in range(30):
        fair.send(fair_app.record, fair_app.TENANTS[i % 3], f"{fair_app.TENANTS[i % 3]}-{i}")
    done = fair.wait_for(30)
    assert all(line["label"].startswith(line["tenant"] + "-") for line in done)
    assert Counter(line["tenant"] for line in done) == {t: 10 for t in fair_app.TENANTS[:3]}


@_with_workers
def test_a_sigkilled_worker_loses_nothing_and_redelivers_in_its_tenant(fair: Fair) -> None:
    """acks_late + reject_on_worker_lost; the visibility timeout restores the messages
    the dead worker held, at the head of their lane."""
    victim = fair.worker("prefork", 2, FAIR_DURABLE="1")
    for i in range(4):
        fair.send(fair_app.sleepy, "acme", f"acme-{i}", 1.5)
    for i in range(3):
        fair.send(fair_app.record, "globex", f"globex-{i}")
    wait_until(lambda: sum(line["label"].startswith("started:acme") for line in fair.log()) >= 2,
               TIMEOUT, "two acme tasks started", fair.details)  # fmt: skip
    victim.kill()
    fair.worker("prefork", 2, FAIR_DURABLE="1")
    done = fair.wait_for(7, timeout=TIMEOUT)
    labels = Counter(line["label"] for line in done)
    assert set(labels) == {f"acme-{i}" for i in range(4)} | {f"globex-{i}" for i in range(3)}
    assert all(line["label"].startswith(line["tenant"]) for line in done)


@_with_workers
def test_a_redis_restart_loses_no_task_that_redis_kept(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis is killed mid-run and started again on its append-only file: the worker
    reconnects (its scripts are gone: loaded again), every task runs, each in its tenant,
    and the capped task's slots come back; a task whose ack was lost may run twice. A
    message whose take was in flight when Redis died (Redis popped it, the reply was
    lost) was recorded as unacked by the same script, and comes back after the
    visibility timeout: none is lost."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    log_url = redis_db_url(redis_url, FAIR_DB)
    setup = Fair(server.url, tmp_path, monkeypatch, log_url=log_url)
    try:
        setup.worker("threads", 4, FAIR_DURABLE="1", FAIR_SLOT_TTL="3")
        labels = []
        for i in range(40):
            tenant = fair_app.TENANTS[i % 3]
            task = fair_app.limited if i % 4 == 0 else fair_app.record
            labels.append(f"{tenant}-{i}")
            setup.send(task, tenant, labels[-1], 0.1)
        wait_until(lambda: len(setup.finished()) >= 8, TIMEOUT, "8 tasks finished",
                   setup.details)  # fmt: skip
        server.kill()
        time.sleep(1.0)
        server.start()
        for i in range(40, 50):
            labels.append(f"{fair_app.TENANTS[i % 3]}-{i}")
            setup.send(fair_app.record, fair_app.TENANTS[i % 3], labels[-1])
        def missing() -> set[str]:
            return set(labels) - {line["label"] for line in setup.finished()}

        wait_until(lambda: not missing(), 3 * TIMEOUT + fair_app.VISIBILITY_TIMEOUT,
                   "every task finished after the restart", setup.details)  # fmt: skip
        time.sleep(fair_app.VISIBILITY_TIMEOUT + 3 + 1)  # any redelivery has run by now
        done = setup.finished()
        assert {line["label"] for line in done} <= set(labels)
        assert all(line["label"].startswith(line["tenant"] + "-") for line in done)
        log = setup.workers[0].log(tail=400_000)
        assert "Connection to broker lost" in log and "could not release a slot" in log
        assert "Signal handler" not in log  # no receiver of ours raised
    finally:
        setup.stop()
        server.kill()
        setup.log_redis.delete(fair_app.LOG)


# -- limits -----------------------------------------------------------------------------------


@_with_workers
def test_tenant_concurrency_holds_across_two_workers(fair: Fair) -> None:
    fair.worker("prefork", 3)
    fair.worker("threads", 3)
    for i in range(10):
        fair.send(fair_app.limited, "acme", f"acme-{i}", 0.3)
    for i in range(4):
        fair.send(fair_app.limited, "globex", f"globex-{i}", 0.3)
    for i in range(3):
        fair.send(fair_app.billing_a, "initech", f"initech-a{i}")
        fair.send(fair_app.billing_b, "initech", f"initech-b{i}")
    done = fair.wait_for(20)
    by_tenant = {name: [d for d in done if d["tenant"] == name] for name in fair_app.TENANTS}
    assert _max_overlap(by_tenant["acme"]) == 2
    assert _max_overlap(by_tenant["globex"]) == 2
    assert _max_overlap(by_tenant["initech"]) == 1  # one slot shared by billing_a and _b
    acme_order = [d["label"] for d in sorted(by_tenant["acme"], key=lambda d: d["start"])]
    # delivered oldest first; two admitted together may start in either order
    assert all(abs(acme_order.index(f"acme-{i}") - i) <= 1 for i in range(10)), acme_order
    assert fair.redis.zcard(f"{scripts.ROOT}:lease:tests.fair_app.limited\nacme") == 0


@_with_workers
def test_held_back_tasks_keep_their_order_and_do_not_spin(fair: Fair) -> None:
    fair.worker("threads", 4)
    for i in range(2):
        fair.send(fair_app.limited_sleepy, "acme", f"long-{i}", 3.0)
    for i in range(20):
        fair.send(fair_app.limited_sleepy, "acme", f"acme-{i}", 0.0)
    wait_until(lambda: sum(line["label"].startswith("started:long") for line in fair.log()) == 2,
               TIMEOUT, "both long tasks started", fair.details)  # fmt: skip
    time.sleep(0.3)
    with fair.app.app_context():
        row = {r.tenant: r for r in fair.extension.queue_rows()}["acme"]
    assert (row.waiting, row.held_back, row.running) == (0, 20, 2)
    fair.redis.config_resetstat()
    time.sleep(2.0)
    stats = fair.redis.info("commandstats")
    calls = {name: stat["calls"] for name, stat in stats.items()}
    # the worker idles: its channels' BRPOP and one tick script a second each, and lease
    # renewals; the 20 held-back tasks are not picked, moved or pushed while they wait
    for moving in ("lmove", "lpop", "rpop", "lpush", "rpush"):
        assert calls.get(f"cmdstat_{moving}", 0) == 0, calls
    assert calls.get("cmdstat_evalsha", 0) <= 8, calls
    assert sum(calls.values()) < 150, calls
    done = fair.wait_for(22)
    order = [d["label"] for d in sorted(done, key=lambda d: d["start"]) if "acme-" in d["label"]]
    assert order == [f"acme-{i}" for i in range(20)]


@_with_workers
def test_a_sigkilled_workers_slot_comes_back_within_the_ttl(fair: Fair) -> None:
    ttl = 3.0
    victim = fair.worker("prefork", 2, FAIR_SLOT_TTL=str(ttl))
    for i in range(2):
        fair.send(fair_app.limited_sleepy, "acme", f"long-{i}", 60.0)
    wait_until(lambda: sum(line["label"].startswith("started:long") for line in fair.log()) == 2,
               TIMEOUT, "both long tasks started", fair.details)  # fmt: skip
    fair.worker("threads", 2, FAIR_SLOT_TTL=str(ttl))  # ready before the crash
    victim.kill()
    killed = time.time()
    fair.send(fair_app.limited_sleepy, "acme", "after", 0.0)
    done = fair.wait_for(1, timeout=ttl + 10)
    assert done[0]["label"] == "after"
    # held back while the dead worker's leases lived (renewed every ttl / 3 until the
    # kill), then started within the TTL (and a tick)
    assert ttl * 2 / 3 - 0.5 <= done[0]["start"] - killed <= ttl + 1.5


@_with_workers
def test_tenant_rate_limit_spaces_the_starts(fair: Fair) -> None:
    fair.worker("threads", 4)
    fair.worker("prefork", 2)
    for i in range(8):
        fair.send(fair_app.rated, "acme", f"acme-{i}")
    fair.send(fair_app.rated, "globex", "globex-0")
    done = fair.wait_for(9)
    starts = sorted(d["start"] for d in done if d["tenant"] == "acme")
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.25 - 0.03, gaps  # "4/s", across both workers
    assert [d["label"] for d in sorted(done, key=lambda d: d["start"])
            if d["tenant"] == "acme"] == [f"acme-{i}" for i in range(8)]  # fmt: skip


@pytest.mark.redis
def test_release_is_fenced_and_idempotent_and_a_hold_fires_the_signal(fair: Fair) -> None:
    """At the channel: a lease freed twice frees one slot; a lease that expired and whose
    slot went to another task frees nothing when it comes late."""
    held: list[dict[str, t.Any]] = []

    def on_held(sender: t.Any, **kwargs: t.Any) -> None:
        held.append(kwargs)

    signals.task_held_back.connect(on_held)
    try:
        for i in range(3):
            fair.send(fair_app.billing_a, "acme", f"a{i}")
        with fair.celery.connection_for_read() as connection:
            channel = connection.default_channel
            assert isinstance(channel, FairChannel)
            client, root = fair.redis, scripts.ROOT

            def pick(ttl: float) -> dict[str, t.Any] | None:
                channel.slot_ttl = ttl
                assert fair.redis.rpop(fair.queue) == scripts.TOKEN.encode()
                return channel._pick(fair.queue)

            first = pick(60.0)
            assert first is not None and pick(60.0) is None  # the only slot is taken
            assert held == [{"task": "tests.fair_app.billing_a", "tenant": "acme"}]
            assert _held_back_count("acme", "tests.fair_app.billing_a") >= 1  # prometheus
            lease = first["headers"][LEASE_HEADER]
            LEASES.hold(lease, client, root, 60.0)
            assert LEASES.release(lease) is True
            assert LEASES.release(lease) is False  # the second release frees nothing
            assert LEASES.settle() == [True]  # Redis freed the slot once
            second = pick(0.5)  # the released slot rang the doorbell again
            assert second is not None
            time.sleep(0.6)  # the second lease expires unreleased...
            LEASES._held[second["headers"][LEASE_HEADER]] = (client, root)
            channel._next_tick = 0.0
            channel._maybe_tick()
            third = pick(60.0)  # ...and the slot went to the third task
            assert third is not None
            assert LEASES.release(second["headers"][LEASE_HEADER]) is True  # sent...
            assert LEASES.settle() == [False]  # ...late: fenced, it freed nothing
            live = fair.redis.zrange(f"{root}:lease:billing-api\nacme", 0, -1)
            assert live == [third["headers"][LEASE_HEADER].split("\r")[1].encode()]
    finally:
        signals.task_held_back.disconnect(on_held)


def _label(raw: dict[str, t.Any]) -> str:
    """The label argument of a message of one of ``fair_app``'s tasks."""
    return t.cast(str, raw["headers"]["argsrepr"].split("'")[1])


@pytest.mark.redis
def test_a_message_the_worker_rejects_frees_its_slot_at_once(fair: Fair) -> None:
    """kombu requeues a message taken for a queue whose consumer was cancelled meanwhile
    ("no consumers"), and a worker rejects a message it will not run: neither keeps its
    slot until the lease expires, and the requeued one is not lost."""
    for i in range(2):
        fair.send(fair_app.billing_a, "acme", f"a{i}")
    leases = f"{scripts.ROOT}:lease:billing-api\nacme"
    with fair.celery.connection_for_read() as connection:
        channel = connection.default_channel
        first = channel._get(fair.queue)
        assert fair.redis.zcard(leases) == 1
        connection.transport._reject_inbound_message(first)  # what "no consumers" does
        assert fair.redis.zcard(leases) == 0
        second = channel._get(fair.queue)  # the slot is free at once; a0 went to the end
        assert (_label(first), _label(second)) == ("a0", "a1")
        message = channel.Message(second, channel=channel)
        channel.qos.append(message, message.delivery_tag)
        channel.basic_reject(message.delivery_tag, requeue=False)
        assert fair.redis.zcard(leases) == 0
        assert _label(channel._get(fair.queue)) == "a0"
        with pytest.raises(Empty):
            channel._get(fair.queue)


@pytest.mark.redis
def test_a_consumer_gone_right_after_its_take_loses_nothing(fair: Fair) -> None:
    """The script that takes a tenant message records it as unacked in the same step: a
    consumer killed before it reads the reply (or whose connection drops) leaves the
    message for the visibility timeout to bring back, where kombu's own pop-then-record
    would have lost it."""
    fair.send(fair_app.record, "acme", "a0")
    fair.send(fair_app.record, "globex", "g0")
    with fair.celery.connection_for_read() as connection:
        channel = connection.default_channel
        doorbells = [channel._q_for_pri(fair.queue, pri) for pri in channel.priority_steps]
        take = channel._script(scripts.TAKE)
        reply = take(keys=[channel._root], args=channel._take_args("t", doorbells),
                     client=channel.client)  # fmt: skip
        # the consumer is gone here: kombu never saw the message
        status, _, raw, _, recorded, *_ = reply
        taken = json.loads(raw)
        tag = taken["properties"]["delivery_tag"]
        assert (status, recorded, _label(taken)) == (1, 1, "a0")
        record = json.loads(fair.redis.hget(channel.unacked_key, tag))
        delivery = taken["properties"]["delivery_info"]
        assert record == [taken, delivery["exchange"], delivery["routing_key"]]  # as kombu's
        assert abs(fair.redis.zscore(channel.unacked_index_key, tag) - time.time()) < 5

        channel.visibility_timeout = 0
        time.sleep(0.01)
        channel.qos.restore_visible()
        assert not fair.redis.hexists(channel.unacked_key, tag)
        labels = [_label(channel._get(fair.queue)) for _ in range(2)]
        assert sorted(labels) == ["a0", "g0"]
        with pytest.raises(Empty):
            channel._get(fair.queue)



@pytest.mark.redis
def test_a_lane_item_of_an_earlier_release_is_still_delivered(fair: Fair) -> None:
    """Lanes filled by an earlier release hold the message alone (no delivery tag in front):
    it is delivered, and kombu records it as unacked as before."""
    fair.send(fair_app.record, "acme", "a0")
    with fair.celery.connection_for_read() as connection:
        channel = connection.default_channel
        message = channel._get(fair.queue)
        legacy = [scripts.ROOT, fair.queue, "acme", json.dumps(message), 0, 0]
        channel._script(scripts.PUT)(keys=[channel._root], args=legacy, client=channel.client)
        doorbells = [channel._q_for_pri(fair.queue, pri) for pri in channel.priority_steps]
        take = channel._script(scripts.TAKE)
        reply = take(keys=[channel._root], args=channel._take_args("t", doorbells),
                     client=channel.client)  # fmt: skip
        assert (reply[0], reply[4], json.loads(reply[2])) == (1, 0, message)
        assert fair.redis.hlen(channel.unacked_key) == 0  # left to kombu's QoS.append


@pytest.mark.redis
def test_a_recover_keeps_the_slots_of_the_messages_acked_already(fair: Fair) -> None:
    """``basic_recover(requeue=True)`` gives back what is unacked; an early-acked capped
    task is running: its slot stays taken."""
    from kombu import Consumer

    fair.send(fair_app.limited, "acme", "a0")

    def leases() -> int:
        return sum(int(fair.redis.zcard(key)) for key in fair.redis.keys(f"{scripts.ROOT}:lease:*"))

    with fair.celery.connection_for_read() as connection:
        channel = connection.default_channel
        queue = fair.celery.amqp.queues[fair.queue]
        with Consumer(channel, [queue], accept=["json"], on_message=lambda m: m.ack()):
            connection.drain_events(timeout=5)
        assert leases() == 1
        channel.basic_recover(requeue=True)
        assert leases() == 1

@pytest.mark.redis
def test_a_consumer_without_acks_leaves_no_unacked_record(fair: Fair) -> None:
    """kombu keeps no unacked record for a ``no_ack`` consumer; nor does the take, or the
    visibility timeout would deliver the message a second time."""
    from kombu import Consumer, Queue

    fair.send(fair_app.record, "acme", "a0")
    got: list[str] = []
    with fair.celery.connection_for_read() as connection:
        channel = connection.default_channel
        queue = Queue(fair.queue, channel=channel)
        with Consumer(channel, [queue], no_ack=True, accept=["json"],
                      on_message=lambda message: got.append(message.payload[0][0])):  # fmt: skip
            connection.drain_events(timeout=5)
        assert got == ["a0"]
        assert fair.redis.hlen(channel.unacked_key) == 0
        channel.ack_emulation = False  # kombu's QoS without records: none from the take either
        assert channel._unacked_keys() == ("", "", "")

@pytest.mark.redis
def test_a_channel_closed_after_its_connection_was_collected_keeps_its_unacked(
    fair: Fair,
) -> None:
    """Celery collects a lost connection before it closes the channel: the channel then
    has no client to give its unacked messages back with. They stay in Redis's unacked
    set (for the visibility timeout to bring back) instead of the worker stopping."""
    fair.send(fair_app.record, "acme", "a0")
    with fair.celery.connection_for_read() as connection:
        channel = connection.default_channel
        message = channel.Message(channel._get(fair.queue), channel=channel)
        channel.qos.append(message, message.delivery_tag)
        transport_client, channel.connection.client = channel.connection.client, None
        try:
            channel._disconnect_pools()
            channel.qos.restore_unacked()  # kombu would raise AttributeError here
        finally:
            channel.connection.client = transport_client
        assert fair.redis.hexists(channel.unacked_key, message.delivery_tag)


@pytest.mark.redis
def test_flask_tenant_jobs_queues_shows_a_table(fair: Fair) -> None:
    for i in range(3):
        fair.send(fair_app.record, "acme", f"a{i}")
    fair.send(fair_app.record, "globex", "g", countdown=60)
    result = fair.app.test_cli_runner().invoke(args=["tenant-jobs", "queues"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["tenant", "waiting", "held", "back", "scheduled", "running"]
    assert lines[1].split() == ["acme", "3", "0", "0", "0"]
    assert lines[2].split() == ["globex", "0", "0", "1", "0"]


@_with_workers
def test_a_warm_shutdown_gives_back_its_prefetched_task_and_slot(fair: Fair) -> None:
    worker = fair.worker("threads", 1)
    for i in range(3):
        fair.send(fair_app.limited_sleepy, "acme", f"long-{i}", 2.0)
    wait_until(lambda: any(line["label"] == "started:long-0" for line in fair.log()),
               TIMEOUT, "the first task started", fair.details)  # fmt: skip
    leases = f"{scripts.ROOT}:lease:tests.fair_app.limited_sleepy\nacme"
    wait_until(lambda: fair.redis.zcard(leases) == 2, 5.0, "the next task prefetched",
               fair.details)  # fmt: skip
    worker.stop()  # SIGTERM: the running task ends, the prefetched one is given back
    assert [line["label"] for line in fair.finished()] == ["long-0"]
    assert fair.redis.zcard(leases) == 0  # at once, not after TENANT_JOBS_SLOT_TTL
    with fair.app.app_context():
        assert fair.extension.backlog() == {"acme": 2}
    fair.worker("threads", 1)
    assert [line["label"] for line in fair.wait_for(3)] == ["long-0", "long-1", "long-2"]


@pytest.mark.redis
def test_hostile_tenant_and_limit_headers_do_not_make_lanes(fair: Fair) -> None:
    """A message by name (no tenant check at the sender) with a malformed tenant goes to
    the plain list, where the worker refuses it as before; a malformed limit header
    leaves the task in its tenant's lane, unlimited; nothing reaches a Lua error."""
    hostile = ["acme\nglobex", "ACME", "", "a" * 300, "acme\r", "x:lane:y", 7]
    with fair.app.app_context():
        for tenant in hostile:
            fair.celery.send_task("no.such.task", headers={"tenant_for_job": tenant})
        for limit in ["k\n1", "k\nabc\n0", "k\n1\ninf", "\n1\n0", "k\r\n1\n0", 5]:
            fair.celery.send_task("no.such.task", headers={"tenant_for_job": "acme",
                                                           "tenant_jobs_limit": limit})
        assert fair.extension.backlog() == {"acme": 6}
    assert fair.redis.llen(fair.queue) == len(hostile) + 6  # plain messages and tokens
    assert fair.redis.lrange(f"{scripts.ROOT}:{fair.queue}:ring", 0, -1) == [b"acme"]


def _held_back_count(tenant: str, task: str) -> float:
    """``tenant_jobs_tasks_held_back_total`` of this process (prometheus-client)."""
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "tenant_jobs_tasks_held_back_total", {"tenant": tenant, "task": task}
    )
    return value or 0.0


@pytest.mark.redis
def test_purge_drops_tenant_lanes_too(fair: Fair) -> None:
    for i in range(3):
        fair.send(fair_app.record, "acme", f"a{i}")
    fair.send(fair_app.record, "globex", "later", countdown=60)
    fair.send(fair_app.plain, None, "plain")
    with fair.app.app_context():
        assert fair.celery.control.purge() == 5
        assert fair.extension.backlog() == {}
    assert [key for key in fair.redis.keys(f"{scripts.ROOT}:{fair.queue}*")] == []
    assert fair.redis.llen(fair.queue) == 0


@_with_workers
def test_priorities_keep_their_meaning(fair: Fair) -> None:
    """On Redis, priority 0 (the default) is served before 9; each step has its own turns."""
    for i in range(2):
        fair.send(fair_app.record, "acme", f"acme-low-{i}", priority=9)
    fair.send(fair_app.record, "globex", "globex-low", priority=9)
    for i in range(2):
        fair.send(fair_app.record, "acme", f"acme-{i}")
    fair.send(fair_app.record, "initech", "initech")
    fair.worker("solo")
    assert [line["label"] for line in fair.wait_for(6)] == [
        "acme-0", "initech", "acme-1", "acme-low-0", "globex-low", "acme-low-1",
    ]  # fmt: skip


@_with_workers
@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_a_prefetched_task_keeps_its_slot_while_the_worker_is_busy(fair: Fair, pool: str) -> None:
    """A message waiting in a busy worker for a free pool slot holds a lease: the worker
    renews it (no doorbell wait, so no tick, runs meanwhile), so it does not expire."""
    ttl = 2.0  # without an event loop (gevent) the worker renews about once a second
    fair.worker(pool, 1, FAIR_SLOT_TTL=str(ttl), FAIR_VISIBILITY_TIMEOUT="30")
    fair.send(fair_app.limited_sleepy, "acme", "long", 6.5)
    fair.send(fair_app.limited_sleepy, "acme", "next", 0.0)
    wait_until(lambda: any(line["label"] == "started:long" for line in fair.log()),
               TIMEOUT, "the long task started", fair.details)  # fmt: skip
    leases = f"{scripts.ROOT}:lease:tests.fair_app.limited_sleepy\nacme"

    def live() -> int:
        seconds, micros = fair.redis.time()
        return int(fair.redis.zcount(leases, seconds + micros / 1e6, "+inf"))

    wait_until(lambda: live() == 2, 5.0, "the next task prefetched", fair.details)
    prefetched = time.monotonic()
    while not any(line["label"] == "long" for line in fair.log()):
        assert live() == 2 or any(line["label"] == "long" for line in fair.log()), fair.details()
        time.sleep(0.1)
    assert time.monotonic() - prefetched > 1.5 * ttl  # longer than a lease lives unrenewed
    assert [line["label"] for line in fair.wait_for(2)] == ["long", "next"]


@pytest.mark.redis
def test_kombus_global_keyprefix_prefixes_every_key(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``global_keyprefix`` every fair-dispatch key is under it; ``basic_get`` (the
    synchronous path) delivers round-robin too."""
    setup = Fair(redis_db_url(redis_url, FAIR_DB), tmp_path, monkeypatch)
    setup.celery.conf.broker_transport_options = {
        **setup.celery.conf.broker_transport_options, "global_keyprefix": "pfx:"
    }
    for label in ("a0", "a1"):
        setup.send(fair_app.billing_a, "acme", label)
    setup.send(fair_app.record, "globex", "g0")
    assert all(key.startswith(b"pfx:") for key in setup.redis.keys("*"))
    assert setup.redis.exists(f"pfx:{scripts.ROOT}:{setup.queue}:ring")
    with setup.app.app_context():
        assert setup.extension.backlog() == {"acme": 2, "globex": 1}
    with setup.celery.connection_for_read() as connection:
        channel = connection.default_channel
        first, second = channel._get(setup.queue), channel._get(setup.queue)
        assert [m["headers"]["tenant_for_job"] for m in (first, second)] == ["acme", "globex"]
        lease = first["headers"][LEASE_HEADER]
        assert setup.redis.zcard(f"pfx:{scripts.ROOT}:lease:billing-api\nacme") == 1
        with pytest.raises(Empty):  # the slot is taken: nothing to get
            channel._get(setup.queue)
        LEASES.hold(lease, setup.redis, f"pfx:{scripts.ROOT}", 60.0)
        assert LEASES.release(lease) is True
        assert LEASES.settle() == [True]
        assert channel._get(setup.queue)["headers"]["tenant_for_job"] == "acme"


@pytest.mark.redis
def test_a_busy_consumer_takes_each_message_in_one_round_trip(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the doorbells have something, each delivery is one ``TAKE`` (no ``BRPOP``
    and no second pick), round-robin as before, under ``global_keyprefix``, and it
    carries on when Redis forgets its scripts (a restart, ``SCRIPT FLUSH``)."""
    from kombu import Consumer

    setup = Fair(redis_db_url(redis_url, FAIR_DB), tmp_path, monkeypatch)
    setup.celery.conf.broker_transport_options = {
        **setup.celery.conf.broker_transport_options, "global_keyprefix": "pfx:"
    }
    for i in range(20):
        setup.send(fair_app.record, "acme", f"acme-{i}")
    for i in range(10):
        setup.send(fair_app.record, "globex", f"globex-{i}")
    setup.send(fair_app.plain, None, "plain")
    received: list[str] = []
    recorded: list[bool] = []  # kombu's unacked record of each message, under the prefix

    def on_message(body: t.Any, message: t.Any) -> None:
        received.append(message.headers.get("tenant_for_job") or "plain")
        recorded.append(bool(setup.redis.hexists("pfx:unacked", message.delivery_tag)))
        message.ack()
        if len(received) == 15:
            setup.redis.script_flush()

    queue = setup.celery.amqp.queues[setup.queue]
    with (
        setup.celery.connection_for_read() as connection,
        Consumer(connection, [queue], callbacks=[on_message], accept=["json"]) as consumer,
    ):
        consumer.qos(prefetch_count=1)
        setup.redis.config_resetstat()
        while len(received) < 31:
            connection.drain_events(timeout=5)
    calls = {name: stat["calls"] for name, stat in setup.redis.info("commandstats").items()}
    assert received[:20] == ["acme", "globex"] * 10
    assert received[20:] == ["acme"] * 10 + ["plain"]
    assert calls.get("cmdstat_brpop", 0) <= 2, calls  # the first wait, and the one after
    assert calls.get("cmdstat_evalsha", 0) <= 31 + 3, calls  # a take each (+ tick, retry)
    assert not setup.redis.keys(f"pfx:{scripts.ROOT}:{setup.queue}:lane:*")
    assert all(recorded), recorded
    assert setup.redis.hlen("pfx:unacked") == 0 and not setup.redis.exists("unacked")


@pytest.mark.redis
def test_a_rate_limited_task_takes_no_lease(fair: Fair) -> None:
    """A rate limit alone is spent in the pick: no lease to renew or release afterwards."""
    fair.send(fair_app.rated, "acme", "acme-0")
    with fair.celery.connection_for_read() as connection:
        message = connection.default_channel._get(fair.queue)
    assert message["headers"]["tenant_for_job"] == "acme"
    assert LEASE_HEADER not in message["headers"]
    assert not fair.redis.keys(f"{scripts.ROOT}:lease:*")
    assert fair.redis.exists(f"{scripts.ROOT}:rate:tests.fair_app.rated\nacme")
