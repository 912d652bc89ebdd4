"""Crashes: a SIGKILLed worker, a SIGKILLed pool process, a Redis restart, mid-batch.

Workers are ``flask tenant-jobs worker -P prefork -c 2`` subprocesses of
``tests.stress_app`` with the durable settings of docs/reliability.md
(``task_acks_late``, ``task_reject_on_worker_lost``, ``worker_prefetch_multiplier=1``,
a Redis ``visibility_timeout`` of :data:`VISIBILITY_TIMEOUT` seconds and abandoned
messages looked for every second). The task, ``tests.stress_app.once``, logs an
attempt row, works a little, then inserts its key's row with ``ON CONFLICT DO
NOTHING``: it is idempotent, so a redelivered task leaves one row, and the
attempt rows show which tasks ran more than once.

Every test kills something in the middle of a batch and then checks that every
task completed, in the tenant it was sent from, with its effect applied exactly
once. The last one shows what a Redis without persistence loses instead.

The first test needs no services: a tenant lookup that fails in the worker (the
tenant source or the database is down) must stop the task before its body.

Redis database ``TEST_CRASH_REDIS_DB`` (default 6) of the shared Redis is flushed
and used; the Redis restarts happen on a ``redis-server`` of this module's own, on
a free port, in a temporary directory (skipped if ``redis-server`` is missing).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import typing as t
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Task
from celery.app.trace import build_tracer
from flask import Flask, has_app_context
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs, TenantSourceError, current_tenant, tenant_task
from tests import stress_app
from tests.worker_processes import (
    Worker,
    flushed_redis_db,
    subprocess_env,
    wait_until,
)


def _with_services(test: t.Callable[..., None]) -> t.Callable[..., None]:
    """Mark a test with real workers: it needs PostgreSQL and Redis, and takes seconds."""
    return pytest.mark.slow(pytest.mark.postgres(pytest.mark.redis(test)))


CRASH_DB = int(os.environ.get("TEST_CRASH_REDIS_DB", "6"))
TENANTS = 5
VISIBILITY_TIMEOUT = 5.0
APP = "tests.stress_app:create_app()"
#: How long all of a batch's results may take, redeliveries included.
RESULTS_TIMEOUT = 90.0


# -- a redis-server of our own ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A ``redis-server`` subprocess in its own session; ``crash()`` SIGKILLs it.

    ``durable``: append-only file with ``appendfsync always`` (every write is on
    disk before Redis answers); otherwise no persistence at all.
    """

    def __init__(self, directory: Path, durable: bool) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.skip("redis-server is not installed: the Redis restart test needs one")
        self.executable = executable
        self.directory = directory
        self.durable = durable
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        if not self.durable:
            persistence = ["--appendonly", "no"]
        command = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            *persistence, "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            wait_until(lambda: self._answers(client), 15, "redis-server answering", self.log)
        finally:
            client.close()

    @staticmethod
    def _answers(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def crash(self) -> None:
        """SIGKILL: no shutdown, no final save; only what is on disk survives."""
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            self.process = None

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    durable = getattr(request, "param", True)
    server = RedisServer(tmp_path, durable)
    server.start()
    try:
        yield server
    finally:
        server.crash()


# -- the harness ------------------------------------------------------------------------------


@dataclass
class Sent:
    task_id: str
    key: str
    tenant: str


class Harness:
    """Sends ``once`` tasks, watches their rows and results, starts workers."""

    def __init__(self, database_url: str, redis_url: str, log_dir: Path) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.queue = f"ftj-crash-{uuid.uuid4().hex[:8]}"
        self.prefix = f"{self.queue}-"
        self.app: Flask = stress_app.create_app(
            database_url=database_url,
            redis_url=redis_url,
            tenants=TENANTS,
            queue=self.queue,
            durable=True,
            visibility_timeout=VISIBILITY_TIMEOUT,
        )
        self.celery = self.app.extensions["celery"]
        self.plain = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
        self.workers: list[Worker] = []

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.celery.close()
        self.plain.dispose()

    def start_worker(self, name: str) -> Worker:
        env = subprocess_env(
            "TEST_STRESS_",
            **stress_app.env_for(
                database_url=self.database_url,
                redis_url=self.redis_url,
                strategy="column",
                tenants=TENANTS,
                schema_format=stress_app.DEFAULT_SCHEMA_FORMAT,
                queue=self.queue,
                durable=True,
                visibility_timeout=VISIBILITY_TIMEOUT,
            ),
        )
        worker = Worker(APP, "prefork", 2, env, self.log_dir / f"{name}.log")
        self.workers.append(worker)
        worker.wait_ready(self.celery, timeout=60)
        return worker

    def send(self, count: int, seconds: float) -> list[Sent]:
        rng = random.Random(self.queue)
        task = self.celery.tasks["tests.stress_app.once"]
        sent = []
        with self.app.app_context():
            for i in range(count):
                tenant = stress_app.tenant_name(rng.randrange(TENANTS))
                key = f"{self.prefix}{i}"
                with stress_app.tenant_jobs.switch(tenant):
                    sent.append(Sent(task.delay(key, tenant, seconds).id, key, tenant))
        return sent

    # -- what the database says -----------------------------------------------------------

    def _query(self, sql: str) -> list[t.Any]:
        with self.plain.connect() as connection:
            return list(connection.execute(sa.text(sql), {"prefix": self.prefix + "%"}))

    def attempts(self) -> Counter[str]:
        rows = self._query("SELECT key FROM ftj_stress_attempt WHERE key LIKE :prefix")
        return Counter(key for (key,) in rows)

    def effects(self) -> dict[str, list[tuple[str, str, str | None]]]:
        """key -> its rows ``(tenant_id, owner, believed)``; exactly one each is right."""
        found: dict[str, list[tuple[str, str, str | None]]] = {}
        sql = "SELECT key, tenant_id, owner, believed FROM ftj_stress_once WHERE key LIKE :prefix"
        for key, tenant_id, owner, believed in self._query(sql):
            found.setdefault(key, []).append((tenant_id, owner, believed))
        return found

    def in_flight(self) -> dict[str, int]:
        """Tasks started and not finished: key -> the pid of the process running it."""
        done = set(self.effects())
        sql = "SELECT key, pid FROM ftj_stress_attempt WHERE key LIKE :prefix"
        return {key: pid for key, pid in self._query(sql) if key not in done}

    def wait_mid_batch(self, done_at_least: int, details: t.Callable[[], str]) -> None:
        """Wait until some tasks are done and at least one is running."""
        wait_until(
            lambda: len(self.effects()) >= done_at_least and bool(self.in_flight()),
            30,
            "the batch to be under way",
            details,
            interval=0.05,
        )

    # -- what the result backend says -----------------------------------------------------

    def results(
        self, sent: list[Sent], timeout: float, details: t.Callable[[], str]
    ) -> dict[str, dict[str, t.Any]]:
        """Every task's stored result, read from Redis (riding out a Redis restart)."""
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        found: dict[str, dict[str, t.Any]] = {}

        def all_there() -> bool:
            missing = [s.task_id for s in sent if s.task_id not in found]
            try:
                values = client.mget([f"celery-task-meta-{task_id}" for task_id in missing])
            except redis.ConnectionError:
                return False
            for task_id, value in zip(missing, values, strict=True):
                if value is not None and json.loads(value)["status"] in {"SUCCESS", "FAILURE"}:
                    found[task_id] = json.loads(value)
            return len(found) == len(sent)

        try:
            wait_until(all_there, timeout, f"results of {len(sent)} tasks", details, 0.25)
        finally:
            client.close()
        return found

    def check_exactly_once(
        self, sent: list[Sent], results: dict[str, dict[str, t.Any]]
    ) -> None:
        """Every task succeeded in its own tenant and left exactly one row there."""
        wrong = []
        for s in sent:
            meta = results[s.task_id]
            value = meta["result"]
            if meta["status"] != "SUCCESS" or (value["tenant"], value["header"]) != (
                s.tenant,
                s.tenant,
            ):
                wrong.append(f"{s.key} sent in {s.tenant}: {meta['status']} {value!r}")
        assert not wrong, "\n".join(wrong)
        effects = self.effects()
        expected = {s.key: [(s.tenant, s.tenant, s.tenant)] for s in sent}
        assert effects == expected


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.fixture(scope="module")
def tables(postgres_url: str) -> Iterator[str]:
    """The ``once`` and ``attempt`` tables (column strategy), dropped afterwards."""
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    tables = [stress_app.OnceRow.__table__, stress_app.Attempt.__table__]
    stress_app.db.metadata.drop_all(engine, tables=tables)
    stress_app.db.metadata.create_all(engine, tables=tables)
    try:
        yield postgres_url
    finally:
        stress_app.db.metadata.drop_all(engine, tables=tables)
        engine.dispose()


@pytest.fixture
def shared_redis(redis_url: str) -> Iterator[str]:
    """Database :data:`CRASH_DB` of the shared Redis, flushed before and after."""
    with flushed_redis_db(redis_url, CRASH_DB) as url:
        yield url


def _harness(database_url: str, redis_url: str, log_dir: Path) -> Harness:
    harness = Harness(database_url, redis_url, log_dir)
    harness.celery.set_current()
    return harness


def _logs(harness: Harness) -> t.Callable[[], str]:
    return lambda: "\n".join(f"{w.log_path.name}:\n{w.log()}" for w in harness.workers)


# -- the tests --------------------------------------------------------------------------------

#: What ``runs_in_tenant`` saw, one entry per run of its body.
BODY_RUNS: list[str | None] = []


@tenant_task(bind=True)
def runs_in_tenant(self: Task) -> str | None:
    BODY_RUNS.append(current_tenant())
    return current_tenant()


def test_a_failing_tenant_lookup_stops_the_task_before_its_body() -> None:
    """The tenant source (a table) is unreachable when the worker looks a tenant up.

    Regression: only ``TenantError`` was kept for ``TenantTask.__call__``; any other
    error escaped the ``task_prerun`` receiver, where Celery only logs it, so the
    body ran with no tenant and the pushed app context was never popped. With
    ``TENANT_JOBS_STALE_SECONDS=0`` no last good list is served once it fails.
    """
    down = False

    def tenants_from_table() -> list[str]:
        if down:
            raise ConnectionError("the tenants table is unreachable")
        return ["acme"]

    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=tenants_from_table,
        TENANT_JOBS_CACHE_SECONDS=0,  # every lookup reads the source
        TENANT_JOBS_STALE_SECONDS=0,  # and a failure leaves no list to serve
        CELERY={"broker_url": "memory://", "result_backend": "cache+memory://"},
    )
    TenantJobs(app, db=SQLAlchemy(app))
    celery_app = app.extensions["celery"]
    task = celery_app.tasks[f"{__name__}.runs_in_tenant"]
    # What a worker runs for each message (no broker needed).
    trace = build_tracer(task.name, task, app=celery_app, eager=False, propagate=False)
    BODY_RUNS.clear()

    def run(task_id: str) -> t.Any:
        request = {"id": task_id, "delivery_info": {}, "tenant_for_job": "acme"}
        return trace(task_id, (), {}, request)

    assert run("up").retval == "acme"
    down = True
    failed = run("down")
    assert isinstance(failed.retval.exception, TenantSourceError)
    assert "the tenants table is unreachable" in str(failed.retval.exception)
    assert celery_app.AsyncResult("down").state == "FAILURE"
    assert BODY_RUNS == ["acme"]  # the body did not run without its tenant
    assert not has_app_context()  # and the app context was popped
    assert current_tenant() is None
    down = False
    assert run("up-again").retval == "acme"
    assert BODY_RUNS == ["acme", "acme"]


@_with_services
def test_sigkill_of_the_whole_worker_loses_no_task(
    tables: str, shared_redis: str, tmp_path: Path
) -> None:
    """The worker's whole process group is SIGKILLed mid-batch; a new worker takes over.

    The killed tasks were never acknowledged (``acks_late``): their messages stay in
    Redis's unacked set and come back once the visibility timeout has passed.
    """
    harness = _harness(tables, shared_redis, tmp_path)
    try:
        first = harness.start_worker("first")
        sent = harness.send(24, seconds=0.5)
        harness.wait_mid_batch(4, _logs(harness))
        processes = [first.pid, *first.pool_pids()]
        assert len(processes) == 3, processes  # the main process and two pool processes
        first.kill()
        wait_until(lambda: not any(map(_alive, processes)), 10, "the killed worker to be gone")
        interrupted = set(harness.in_flight())  # started, never finished
        assert len(harness.effects()) < len(sent)  # the crash did cut the batch short

        harness.start_worker("second")
        results = harness.results(sent, RESULTS_TIMEOUT, _logs(harness))
        harness.check_exactly_once(sent, results)
        attempts = harness.attempts()
        assert interrupted, "no task was running when the worker was killed"
        assert all(attempts[key] >= 2 for key in interrupted), (interrupted, attempts)
    finally:
        harness.close()


@_with_services
def test_sigkill_of_a_pool_process_requeues_its_task(
    tables: str, shared_redis: str, tmp_path: Path
) -> None:
    """One prefork pool process is SIGKILLed while running a task: with
    ``task_reject_on_worker_lost`` the worker requeues the task at once (no visibility
    timeout to wait for), replaces the process and runs it again, in its tenant."""
    harness = _harness(tables, shared_redis, tmp_path)
    try:
        worker = harness.start_worker("worker")
        sent = harness.send(8, seconds=1.0)
        harness.wait_mid_batch(1, _logs(harness))
        pid = next(iter(harness.in_flight().values()))
        assert pid in worker.pool_pids(), (pid, worker.pool_pids())
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), 10, "the killed pool process to be gone")
        interrupted = [key for key, runner in harness.in_flight().items() if runner == pid]

        results = harness.results(sent, RESULTS_TIMEOUT, _logs(harness))
        elapsed = time.monotonic() - started
        harness.check_exactly_once(sent, results)
        assert interrupted, "the killed process was not running a task"
        assert all(harness.attempts()[key] >= 2 for key in interrupted)
        assert worker.popen.poll() is None  # the worker lived on
        assert elapsed < VISIBILITY_TIMEOUT + 5  # requeued by the worker, not restored
        assert "WorkerLostError" in worker.log(10**6)
    finally:
        harness.close()


@_with_services
def test_redis_restart_with_aof_loses_no_task(
    tables: str, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis (append-only file, ``appendfsync always``) is SIGKILLed mid-batch and
    started again on the same files; the worker reconnects and every task still
    completes exactly once. Tasks cut off by the restart run again (at least once)."""
    harness = _harness(tables, own_redis.url, tmp_path)
    try:
        harness.start_worker("worker")
        sent = harness.send(40, seconds=0.25)
        harness.wait_mid_batch(6, _logs(harness))
        own_redis.crash()
        time.sleep(1.0)
        own_redis.start()

        def details() -> str:
            return _logs(harness)() + "\nredis:\n" + own_redis.log()

        results = harness.results(sent, RESULTS_TIMEOUT, details)
        harness.check_exactly_once(sent, results)
        assert all(worker.popen.poll() is None for worker in harness.workers)
    finally:
        harness.close()


@_with_services
@pytest.mark.parametrize("own_redis", [False], indirect=True, ids=["no-persistence"])
def test_redis_restart_without_persistence_loses_the_queue(
    tables: str, own_redis: RedisServer, tmp_path: Path
) -> None:
    """What the durable settings cannot save: a Redis restarted without persistence
    comes back empty. The tasks still queued, those running (their unacknowledged
    messages) and every stored result are gone; only the tasks that were running
    finish (their results land in the new, empty Redis)."""
    harness = _harness(tables, own_redis.url, tmp_path)
    try:
        harness.start_worker("worker")
        sent = harness.send(40, seconds=0.25)
        harness.wait_mid_batch(6, _logs(harness))
        own_redis.crash()
        time.sleep(1.0)
        own_redis.start()
        # Long enough for any restored message to have run (visibility timeout + margin).
        time.sleep(VISIBILITY_TIMEOUT + 4)
        done = harness.effects()
        client = redis.Redis.from_url(own_redis.url)
        try:
            stored = sum(
                value is not None
                for value in client.mget([f"celery-task-meta-{s.task_id}" for s in sent])
            )
        finally:
            client.close()
        assert 6 <= len(done) < len(sent), len(done)  # the rest of the batch is lost
        assert stored <= 2  # only the tasks running at the restart stored results again
        assert all(rows == [(rows[0][0],) * 3] for rows in done.values())
    finally:
        harness.close()
