"""Real Celery worker subprocesses (prefork, threads, gevent), real beat and the CLI.

Every worker here is a ``flask --app ... tenant-jobs worker -P <pool> -c <n>``
subprocess in its own session, on Redis (broker and results, a dedicated
database number flushed first) and the real PostgreSQL. Tasks are sent from
this process; the tasks of :mod:`tests.jobs_app` report the tenant they saw,
and ``write_seen`` leaves a row recording the tenant it believed it had, so
cross-tenant leaks show up both in the results and in the database.

The pool workers read their tenants from the shared ``jobs_tenant`` table
(counting the reads in Redis) and open a pooled database connection before
they fork, so the same workers also show that tenant lookups are cached and
that prefork children do not share the parent's connections.

Set ``TEST_POSTGRES_URL`` and ``TEST_REDIS_URL`` to point at the services. The
Redis databases used are ``TEST_WORKERS_REDIS_DB`` (default 12) and the one after
it (for beat), each flushed first; queue names are unique per run, so that a
concurrent run sharing the broker cannot take this run's tasks.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
import typing as t
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from celery import Celery, Signature, Task, chain, chord, group
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from flask import Flask

from flask_tenant_jobs import ConfigurationError
from flask_tenant_jobs.beat import TenantScheduler
from flask_tenant_jobs.cli import _pool_option
from tests.jobs_app import (
    PARENT_BACKEND_PID_KEY,
    SOURCE_CALLS_KEY,
    TENANTS,
    Seen,
    Tenant,
    create_app,
    db,
    tenant_jobs,
)
from tests.worker_processes import (
    ROOT,
    FlaskProcess,
    Worker,
    redis_db_url,
    subprocess_env,
    wait_until,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

redis = pytest.importorskip("redis")

APP = "tests.jobs_app:create_app()"
VARIANT_APP = "tests.jobs_app:create_variant_app()"
#: Redis database numbers: the pool workers, and the beat test's worker and beat.
POOL_DB = int(os.environ.get("TEST_WORKERS_REDIS_DB", "12"))
BEAT_DB = POOL_DB + 1
RUN_ID = uuid.uuid4().hex[:8]
#: The default queue of this run's workers and test-side app, and one more given with -Q.
QUEUE = f"ftj-{RUN_ID}"
CUSTOM_QUEUE = f"ftj-custom-{RUN_ID}"
HEADER = "tenant_for_job"
#: How long a batch of results may take to arrive (generous: CI machines are slow).
RESULT_TIMEOUT = 60.0

#: pool -> (concurrency, Celery's pool implementation as ``inspect stats`` names it)
POOLS: dict[str, tuple[int, str]] = {
    "prefork": (2, "celery.concurrency.prefork:TaskPool"),
    "threads": (4, "celery.concurrency.thread:TaskPool"),
    "gevent": (20, "celery.concurrency.gevent:TaskPool"),
}

Observation = dict[str, t.Any]


# -- services, the test-side app ------------------------------------------------------------


@dataclass
class Jobs:
    """The test-side app on the pool workers' broker, and helpers to send and check tasks."""

    app: Flask
    celery: Celery
    redis: t.Any
    database_url: str
    redis_url: str

    def task(self, name: str) -> Task:
        """The task ``tests.jobs_app.<name>`` bound to this Celery app."""
        return self.celery.tasks[f"tests.jobs_app.{name}"]

    def switch(self, tenant: str) -> AbstractContextManager[str | None]:
        return tenant_jobs.switch(tenant)

    def result(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id, app=self.celery)

    def env(self, redis_db: int, **extra: str) -> dict[str, str]:
        """The environment of a worker or beat subprocess on Redis database ``redis_db``."""
        url = redis_db_url(self.redis_url, redis_db)
        return subprocess_env(
            "TEST_JOBS_",
            **{
                "TEST_JOBS_BROKER_URL": url,
                "TEST_JOBS_BACKEND_URL": url,
                "TEST_JOBS_COUNTER_URL": url,
                "TEST_JOBS_DATABASE_URL": self.database_url,
                "TEST_JOBS_DEFAULT_QUEUE": QUEUE,
                **extra,
            },
        )

    def collect(
        self,
        results: list[AsyncResult],
        worker: FlaskProcess | None = None,
        timeout: float = RESULT_TIMEOUT,
    ) -> list[t.Any]:
        """Every result's value (the exception for failed tasks); fail if any is missing."""
        deadline = time.monotonic() + timeout
        values: list[t.Any] = []
        lost: list[str] = []
        for result in results:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 and not result.ready():
                    raise CeleryTimeoutError(result.id)
                values.append(result.get(timeout=max(remaining, 0.1), propagate=False))
            except CeleryTimeoutError:
                lost.append(result.id)
                values.append(None)
        if lost:
            log = f"\nworker log:\n{worker.log()}" if worker is not None else ""
            pytest.fail(
                f"{len(lost)} of {len(results)} tasks gave no result within {timeout}s "
                f"(first: {lost[:3]}){log}"
            )
        return values

    def seen_rows(self, prefix: str = "") -> list[tuple[str, str, str | None]]:
        """``(label, tenant_id, believed)`` of the ``Seen`` rows with labels starting ``prefix``."""
        with tenant_jobs.without_tenant():
            rows = db.session.execute(db.select(Seen).where(Seen.label.startswith(prefix)))
            found = [(row.label, row.tenant_id, row.believed) for row in rows.scalars()]
        db.session.rollback()
        return found

    def clear_seen(self) -> None:
        db.session.execute(Seen.__table__.delete())
        db.session.commit()


@pytest.fixture(scope="module")
def jobs(redis_url: str, postgres_url: str) -> Iterator[Jobs]:
    """The test-side app on the real PostgreSQL and Redis database :data:`POOL_DB`.

    Creates the ``seen`` and ``jobs_tenant`` tables (the latter holding
    :data:`TENANTS`) and drops them afterwards.
    """
    url = redis_db_url(redis_url, POOL_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = create_app(
        SQLALCHEMY_DATABASE_URI=postgres_url,
        CELERY={
            "broker_url": url,
            "result_backend": url,
            "task_always_eager": False,
            "task_default_queue": QUEUE,
        },
    )
    with app.app_context():
        db.drop_all()  # leftovers of an interrupted run
        db.create_all()
        db.session.add_all(Tenant(name=name) for name in TENANTS)
        db.session.commit()
        celery_app = tenant_jobs.celery
    try:
        yield Jobs(app, celery_app, client, postgres_url, redis_url)
    finally:
        with app.app_context():
            db.session.remove()
            db.drop_all()
            db.engine.dispose()
        celery_app.close()
        client.close()


@pytest.fixture(autouse=True)
def _app_context(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test using ``jobs`` runs in its app's context, with its Celery app current."""
    if "jobs" not in request.fixturenames:
        yield
        return
    jobs: Jobs = request.getfixturevalue("jobs")
    jobs.celery.set_current()
    with jobs.app.app_context():
        yield
        db.session.remove()


@pytest.fixture(scope="module", params=list(POOLS))
def pool_worker(
    request: pytest.FixtureRequest, jobs: Jobs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """A worker on each pool, consuming the default queue and :data:`CUSTOM_QUEUE`.

    Its tenants come from the ``jobs_tenant`` table (reads counted in Redis; cached for
    an hour, so the count covers the worker's whole life), and its app pools a database
    connection before it forks.
    """
    pool = t.cast(str, request.param)
    concurrency = POOLS[pool][0]
    jobs.redis.delete(SOURCE_CALLS_KEY, PARENT_BACKEND_PID_KEY)
    env = jobs.env(
        POOL_DB,
        TEST_JOBS_TENANTS_FROM_TABLE="1",
        TEST_JOBS_CACHE_SECONDS="3600",
        TEST_JOBS_WARM_ENGINE="1",
    )
    log_path = tmp_path_factory.mktemp(f"worker-{pool}") / "worker.log"
    worker = Worker(
        VARIANT_APP, pool, concurrency, env, log_path, extra=["-Q", f"{QUEUE},{CUSTOM_QUEUE}"]
    )
    try:
        worker.wait_ready(jobs.celery)
        yield worker
    finally:
        worker.stop()


def unwind(observation: Observation) -> list[Observation]:
    """A chain's observations, first step first (each step gets the previous as its label)."""
    steps = [observation]
    while isinstance(steps[-1]["label"], dict):
        steps.append(steps[-1]["label"])
    return steps[::-1]


def tenants_of(observations: t.Iterable[Observation]) -> list[str | None]:
    return [o["tenant"] for o in observations]


# -- 1. leaks and isolation -----------------------------------------------------------------

LEAK_TASKS = 300
#: The mix of the leak test: mostly database writes, with plain tasks, failures and retries.
KINDS = ("write_seen",) * 4 + ("observe_task", "plain_observe") * 2 + ("fail", "retry_then_observe")


@dataclass
class Sent:
    kind: str
    tenant: str
    label: str
    result: AsyncResult


@pytest.mark.slow
def test_interleaved_tasks_never_cross_tenants(pool_worker: Worker, jobs: Jobs) -> None:
    """~300 interleaved tasks of three tenants: each runs in its own, plain tasks in none."""
    pool = pool_worker.pool
    rng = random.Random(f"leak-{pool}")
    prefix = f"{pool}-leak-"
    jobs.clear_seen()
    sent: list[Sent] = []
    for i in range(LEAK_TASKS):
        tenant, kind, label = rng.choice(TENANTS), rng.choice(KINDS), f"{prefix}{i}"
        with jobs.switch(tenant):  # plain tasks too: they must not pick the tenant up
            sent.append(Sent(kind, tenant, label, jobs.task(kind).delay(label)))

    values = jobs.collect([s.result for s in sent], pool_worker)

    wrong: list[str] = []
    for s, value in zip(sent, values, strict=True):
        if s.kind != "fail" and isinstance(value, BaseException):
            wrong.append(f"{s.label} ({s.kind} in {s.tenant}) failed: {value!r}")
            continue
        if s.kind == "fail":
            if s.result.state != "FAILURE" or str(value) != f"failing in {s.tenant}":
                wrong.append(f"{s.label} ({s.kind} in {s.tenant}): {s.result.state} {value!r}")
            continue
        seen = None if s.kind == "plain_observe" else s.tenant
        ok = value["tenant"] == seen and value["header"] == seen and value["label"] == s.label
        if s.kind == "write_seen":
            ok = ok and value["visible"] == [s.tenant]
        if s.kind == "retry_then_observe":
            ok = ok and value["retries"] == 2
        if not ok:
            wrong.append(f"{s.label} ({s.kind} sent in {s.tenant}): {value!r}")
    assert not wrong, f"{len(wrong)} tasks saw the wrong tenant:\n" + "\n".join(wrong[:20])

    rows = jobs.seen_rows(prefix)
    assert all(tenant_id == believed for _, tenant_id, believed in rows), rows
    expected_rows = {s.label: s.tenant for s in sent if s.kind == "write_seen"}
    assert {label: tenant_id for label, tenant_id, _ in rows} == expected_rows
    assert len(rows) == len(expected_rows)  # one row per write_seen, no duplicates


# -- 2. propagation through a subprocess worker ---------------------------------------------


def test_chain_steps_keep_their_tenant(pool_worker: Worker, jobs: Jobs) -> None:
    observe = jobs.task("observe_task")
    unbound = [observe.s("start"), observe.s(), observe.s()]  # built with no tenant
    with jobs.switch("initech"):
        same_tenant = chain(*unbound).apply_async()
    with jobs.switch("acme"):
        first = observe.s("start")
    with jobs.switch("globex"):
        second = observe.s()
    with jobs.switch("initech"):
        third = observe.s()
        mixed = chain(first, second, third).apply_async()

    same, mixed_value = jobs.collect([same_tenant, mixed], pool_worker)
    assert tenants_of(unwind(same)) == ["initech"] * 3
    assert [o["header"] for o in unwind(same)] == ["initech"] * 3
    assert tenants_of(unwind(mixed_value)) == ["acme", "globex", "initech"]


def test_group_and_chord_keep_their_tenant(pool_worker: Worker, jobs: Jobs) -> None:
    observe = jobs.task("observe_task")
    with jobs.switch("globex"):
        same_group = group(observe.s(i) for i in range(4)).apply_async()

    def one_per_tenant() -> list[Signature]:
        signatures = []
        for tenant in TENANTS:
            with jobs.switch(tenant):
                signatures.append(observe.s(tenant))
        return signatures

    mixed_group = group(one_per_tenant()).apply_async()  # no tenant current: each keeps its own

    with jobs.switch("acme"):
        same_chord = chord(observe.s(i) for i in range(3))(observe.s())
    with jobs.switch("initech"):
        body = observe.s()
    mixed_chord = chord(one_per_tenant())(body)

    values = jobs.collect([same_group, mixed_group, same_chord, mixed_chord], pool_worker)
    same_group_value, mixed_group_value, same_chord_value, mixed_chord_value = values
    assert tenants_of(same_group_value) == ["globex"] * 4
    assert tenants_of(mixed_group_value) == TENANTS
    assert [o["label"] for o in mixed_group_value] == TENANTS

    assert same_chord_value["tenant"] == "acme"  # the body
    assert tenants_of(same_chord_value["label"]) == ["acme"] * 3  # the header
    assert mixed_chord_value["tenant"] == "initech"
    assert tenants_of(mixed_chord_value["label"]) == TENANTS


def test_link_and_link_error_run_in_their_tenant(pool_worker: Worker, jobs: Jobs) -> None:
    observe, fail = jobs.task("observe_task"), jobs.task("fail")
    errback_observe = jobs.task("errback_observe")
    with jobs.switch("globex"):
        callback = observe.s()
        callback_id = callback.freeze().id
        parent = observe.apply_async(("linked",), link=callback)
    with jobs.switch("acme"):
        captured_elsewhere = observe.s()
        captured_id = captured_elsewhere.freeze().id
    with jobs.switch("initech"):
        other_parent = observe.apply_async(("linked",), link=captured_elsewhere)
        errback = errback_observe.s()
        errback_id = errback.freeze().id
        failing = fail.apply_async(("doomed",), link_error=errback)

    results = [parent, jobs.result(callback_id), other_parent, jobs.result(captured_id)]
    results += [failing, jobs.result(errback_id)]
    values = jobs.collect(results, pool_worker)
    parent_value, callback_value, _, captured_value, failure, errback_value = values
    assert parent_value["tenant"] == "globex"
    assert callback_value["tenant"] == "globex"
    assert callback_value["label"] == parent_value
    assert captured_value["tenant"] == "acme"  # a signature keeps the tenant it was built in
    assert str(failure) == "failing in initech"
    assert errback_value["tenant"] == errback_value["header"] == "initech"


def test_retries_and_delayed_tasks_keep_their_tenant(pool_worker: Worker, jobs: Jobs) -> None:
    with jobs.switch("acme"):
        retried = jobs.task("retry_then_observe").delay("retried")
        eta = jobs.task("observe_task").apply_async(
            ("eta",), eta=datetime.now(timezone.utc) + timedelta(seconds=1)
        )
    with jobs.switch("globex"):
        autoretried = jobs.task("autoretry_observe").delay("autoretried")
    with jobs.switch("initech"):
        countdown = jobs.task("observe_task").apply_async(("countdown",), countdown=1)

    values = jobs.collect([retried, eta, autoretried, countdown], pool_worker)
    assert [(v["tenant"], v["header"]) for v in values] == [
        ("acme", "acme"), ("acme", "acme"), ("globex", "globex"), ("initech", "initech"),
    ]  # fmt: skip
    assert values[0]["retries"] == 2


def test_tasks_enqueued_inside_a_task_and_replace(pool_worker: Worker, jobs: Jobs) -> None:
    with jobs.switch("globex"):
        spawner = jobs.task("spawn_child").delay("child")
    with jobs.switch("initech"):
        replaced = jobs.task("replace_with_observe").delay("replaced")
    child_id, replaced_value = jobs.collect([spawner, replaced], pool_worker)
    (child_value,) = jobs.collect([jobs.result(child_id)], pool_worker)
    assert (child_value["tenant"], child_value["header"]) == ("globex", "globex")
    assert child_value["label"] == "child"
    assert replaced_value["task"] == "observe_task"
    assert (replaced_value["tenant"], replaced_value["header"]) == ("initech", "initech")


# -- 3. a bad tenant in a message -----------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "header", "error"),
    [
        ("observe_task", "nope", "TenantNotFoundError"),
        # autoretry_for=(ValueError,), and InvalidTenantNameError is a ValueError: still no retry
        ("autoretry_observe", "Not A Tenant'; DROP TABLE seen; --", "InvalidTenantNameError"),
        ("retry_then_observe", None, "NoTenantError"),
    ],
    ids=["unknown", "malformed", "missing"],
)
def test_bad_tenant_in_a_message_fails_the_task_once(
    pool_worker: Worker, jobs: Jobs, task: str, header: str | None, error: str
) -> None:
    """Sent past the sender-side checks, the task fails before its body, and is not retried."""
    headers = {} if header is None else {HEADER: header}
    bad = Celery.send_task(jobs.celery, f"tests.jobs_app.{task}", args=("bad",), headers=headers)
    (value,) = jobs.collect([bad], pool_worker)
    assert bad.state == "FAILURE"
    assert type(value).__name__ == error, repr(value)

    # The worker carries on, with no tenant left behind.
    with jobs.switch("acme"):
        good = jobs.task("observe_task").delay("after")
    plain = jobs.task("plain_observe").delay("after")
    good_value, plain_value = jobs.collect([good, plain], pool_worker)
    assert good_value["tenant"] == "acme"
    assert plain_value["tenant"] is None

    wait_until(
        lambda: any("raised unexpected" in line for line in pool_worker.task_log_lines(bad.id)),
        10,
        "the failure in the worker log",
        pool_worker.log,
    )
    lines = pool_worker.task_log_lines(bad.id)
    assert not [line for line in lines if re.search(r"\] retry", line)], lines
    assert sum("received" in line for line in lines) == 1, lines  # delivered once, never again


# -- 4. tenant lookups are cached; 7. prefork children get their own connections ------------


def test_tenant_lookups_in_the_worker_are_cached(pool_worker: Worker, jobs: Jobs) -> None:
    """100 tasks read the tenant table at most once per pool process/thread (plus one)."""
    results = []
    for i in range(100):
        with jobs.switch(TENANTS[i % 3]):
            results.append(jobs.task("observe_task").delay(i))
    values = jobs.collect(results, pool_worker)
    assert tenants_of(values) == [TENANTS[i % 3] for i in range(100)]
    calls = int(jobs.redis.get(SOURCE_CALLS_KEY) or 0)
    assert 1 <= calls <= pool_worker.concurrency + 1, f"{calls} reads of the tenant table"


@pytest.mark.parametrize("pool_worker", ["prefork"], indirect=True)
def test_prefork_children_do_not_share_the_parents_connections(
    pool_worker: Worker, jobs: Jobs
) -> None:
    """The parent pooled a connection before forking; no child may use it, nor share one."""
    parent_backend_pid = int(jobs.redis.get(PARENT_BACKEND_PID_KEY))
    results = []
    for i in range(40):
        with jobs.switch(TENANTS[i % 3]):
            results.append(jobs.task("db_backend").delay(i))
    values = jobs.collect(results, pool_worker)
    failed = [value for value in values if isinstance(value, BaseException)]
    assert not failed, f"{len(failed)} tasks failed, e.g. {failed[0]!r}"
    processes_by_backend: dict[int, set[int]] = defaultdict(set)
    for value in values:
        processes_by_backend[value["backend_pid"]].add(value["pid"])
    assert parent_backend_pid not in processes_by_backend
    assert all(len(pids) == 1 for pids in processes_by_backend.values()), processes_by_backend
    assert pool_worker.pid not in {v["pid"] for v in values}  # tasks ran in the children


@pytest.mark.slow
def test_refresh_workers_ends_a_removed_tenants_window_in_every_pool_process(
    jobs: Jobs, tmp_path: Path
) -> None:
    """A tenant removed from the source runs on until the cache expires (an hour here);
    ``refresh_workers()`` ends that at once, in every prefork child of the worker."""
    queue = f"ftj-refresh-{RUN_ID}"
    env = jobs.env(
        POOL_DB,
        TEST_JOBS_TENANTS_FROM_TABLE="1",
        TEST_JOBS_CACHE_SECONDS="3600",
        TEST_JOBS_DEFAULT_QUEUE=queue,
    )
    worker = Worker(VARIANT_APP, "prefork", 2, env, tmp_path / "worker.log")

    def send_to_hooli(label: str) -> list[AsyncResult]:
        return [
            Celery.send_task(
                jobs.celery, "tests.jobs_app.db_backend", (f"{label}-{i}",),
                headers={HEADER: "hooli"}, queue=queue,
            )
            for i in range(12)
        ]  # fmt: skip

    try:
        worker.wait_ready(jobs.celery)
        db.session.add(Tenant(name="hooli"))
        db.session.commit()
        time.sleep(1.1)  # a child's miss may read the source again once a second
        created = jobs.collect(send_to_hooli("created"), worker)
        assert tenants_of(created) == ["hooli"] * 12, created
        assert len({value["pid"] for value in created}) == 2  # both children know hooli now

        db.session.execute(Tenant.__table__.delete().where(Tenant.name == "hooli"))
        db.session.commit()
        removed = jobs.collect(send_to_hooli("removed"), worker)
        assert tenants_of(removed) == ["hooli"] * 12  # the documented window: still cached

        with jobs.app.app_context():
            assert worker.hostname in tenant_jobs.refresh_workers(timeout=2.0)
        refused = jobs.collect(send_to_hooli("refreshed"), worker)
        assert [type(value).__name__ for value in refused] == ["TenantNotFoundError"] * 12
    finally:
        worker.stop()
        db.session.rollback()
        db.session.execute(Tenant.__table__.delete().where(Tenant.name == "hooli"))
        db.session.commit()


# -- 5. the CLI -----------------------------------------------------------------------------


def test_worker_cli_passes_pool_concurrency_and_queues_through(
    pool_worker: Worker, jobs: Jobs
) -> None:
    """``-P``, ``-c`` and ``-Q`` given to ``flask tenant-jobs worker`` reach Celery."""
    inspect = jobs.celery.control.inspect(destination=[pool_worker.hostname], timeout=5, limit=1)
    stats = (inspect.stats() or {}).get(pool_worker.hostname)
    assert stats is not None, pool_worker.log()
    concurrency, implementation = POOLS[pool_worker.pool]
    assert stats["pool"]["implementation"] == implementation
    assert stats["pool"]["max-concurrency"] == concurrency
    if pool_worker.pool == "prefork":
        assert len(stats["pool"]["processes"]) == concurrency
    assert "loaded before the" not in pool_worker.log()  # gevent: patched before the app loaded
    queues = (inspect.active_queues() or {}).get(pool_worker.hostname) or []
    assert {q["name"] for q in queues} == {QUEUE, CUSTOM_QUEUE}

    with jobs.switch("globex"):
        routed = jobs.task("observe_task").apply_async(("routed",), queue=CUSTOM_QUEUE)
    (value,) = jobs.collect([routed], pool_worker)
    assert (value["tenant"], value["label"]) == ("globex", "routed")


def run_cli(jobs: Jobs, app: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``flask --app APP tenant-jobs ARGS`` to completion (60 s at most)."""
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", app, "tenant-jobs", *args],
        cwd=ROOT,
        env=jobs.env(POOL_DB, TEST_JOBS_COUNTER_URL="", **env),  # the pool workers' count only
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("from_table", [False, True], ids=["list", "table"])
def test_list_cli_prints_the_tenants(jobs: Jobs, from_table: bool) -> None:
    if from_table:
        db.session.add(Tenant(name="hooli"))
        db.session.commit()
    try:
        if from_table:
            done = run_cli(jobs, VARIANT_APP, "list", TEST_JOBS_TENANTS_FROM_TABLE="1")
        else:
            done = run_cli(jobs, APP, "list")
    finally:
        db.session.execute(Tenant.__table__.delete().where(Tenant.name == "hooli"))
        db.session.commit()
    assert done.returncode == 0, done.stderr
    expected = sorted([*TENANTS, "hooli"] if from_table else TENANTS)
    assert [line.split()[0] for line in done.stdout.splitlines()] == expected


# -- 6. beat --------------------------------------------------------------------------------


@pytest.fixture
def beat_services(jobs: Jobs) -> Iterator[tuple[Celery, dict[str, str]]]:
    """A control app and the subprocess environment on Redis database :data:`BEAT_DB`."""
    url = redis_db_url(jobs.redis_url, BEAT_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    control = Celery("ftj-beat-control", broker=url, backend=url, set_as_current=False)
    env = jobs.env(
        BEAT_DB,
        TEST_JOBS_TENANTS_FROM_TABLE="1",
        TEST_JOBS_CACHE_SECONDS="0.5",
        TEST_JOBS_BEAT="1",
    )
    try:
        yield control, env
    finally:
        control.close()
        client.close()


@pytest.mark.slow
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_beat_runs_entries_per_tenant_and_picks_up_new_tenants(
    jobs: Jobs, beat_services: tuple[Celery, dict[str, str]], tmp_path: Path, signed: bool
) -> None:
    """A real beat and worker: every tenant per tick, or the entry's ``tenants``; new ones too
    (signed: beat signs each tenant's message and the worker checks it)."""
    control, env = beat_services
    if signed:
        env = {**env, "TEST_JOBS_SIGNING_KEY": "beat-and-worker-share-this-key"}
    jobs.clear_seen()
    worker = Worker(VARIANT_APP, "threads", 4, env, tmp_path / "worker.log")
    processes: list[FlaskProcess] = [worker]

    def logs() -> str:
        return "\n".join(f"{p.log_path.name}:\n{p.log()}" for p in processes)

    def tenants_with(label: str) -> set[str]:
        return {tenant for row_label, tenant, _ in jobs.seen_rows(label) if row_label == label}

    def every_entry_ran() -> bool:
        return tenants_with("beat-all") >= set(TENANTS) and all(
            tenants_with(label) for label in ("beat-globex", "beat-pinned", "beat-subset")
        )

    try:
        worker.wait_ready(control)
        beat_args = ["beat", "-s", str(tmp_path / "schedule"), "-l", "info", "--max-interval", "1"]
        processes.append(FlaskProcess(VARIANT_APP, beat_args, env, tmp_path / "beat.log"))

        wait_until(every_entry_ran, 10, "beat rows in every tenant", logs)
        assert tenants_with("beat-all") == set(TENANTS)
        assert tenants_with("beat-globex") == {"globex"}
        assert tenants_with("beat-pinned") == {"initech"}  # regression: it ran in every tenant
        assert tenants_with("beat-subset") == {"acme"}  # regression: 'hooli' stopped the entry
        assert "skipping tenant(s) 'hooli'" in processes[1].log()

        db.session.add(Tenant(name="umbrella"))  # no restart: beat and worker read the table
        db.session.commit()
        wait_until(
            lambda: "umbrella" in tenants_with("beat-all"), 10, "rows of a tenant added later", logs
        )
        assert tenants_with("beat-globex") == {"globex"}
        assert tenants_with("beat-pinned") == {"initech"}
        rows = jobs.seen_rows("beat-")
        assert all(tenant_id == believed for _, tenant_id, believed in rows), rows
    finally:
        for process in reversed(processes):
            process.stop()
        db.session.rollback()
        db.session.execute(Tenant.__table__.delete().where(Tenant.name == "umbrella"))
        db.session.commit()


BAD_TENANT_OPTIONS: dict[str, tuple[dict[str, t.Any], str]] = {
    "a string": ({"tenants": "acme"}, "single string"),
    "a malformed name": ({"tenants": ["acme", "Not A Name"]}, "Invalid tenant name"),
    "pinned and a subset": (
        {"tenants": ["acme"], "headers": {HEADER: "globex"}},
        "pin the task to tenant 'globex'",
    ),
    "a malformed pinned name": ({"headers": {HEADER: "Globex!"}}, "Invalid tenant name"),
}


@pytest.mark.parametrize(
    ("options", "message"), BAD_TENANT_OPTIONS.values(), ids=BAD_TENANT_OPTIONS.keys()
)
def test_beat_refuses_malformed_tenant_options_when_the_schedule_loads(
    tmp_path: Path, options: dict[str, t.Any], message: str
) -> None:
    """Regression: ``tenants="acme"`` was read letter by letter, at every tick."""
    schedule = {"bad": {"task": "tests.jobs_app.write_seen", "schedule": 1.0, "options": options}}
    app = create_app(CELERY={"broker_url": "memory://", "beat_schedule": schedule})
    celery_app = app.extensions["celery"]
    with pytest.raises(ConfigurationError, match=f"entry 'bad'.*{re.escape(message)}"):
        TenantScheduler(app=celery_app, schedule_filename=str(tmp_path / "schedule"))
    celery_app.close()


@pytest.mark.parametrize(
    ("args", "pool"),
    [
        (("-P", "gevent", "-c", "20"), "gevent"),
        (("-c", "2", "--pool", "threads"), "threads"),
        (("--pool=eventlet",), "eventlet"),
        (("-Pgevent",), "gevent"),
        (("-l", "info"), None),
        (("-P",), None),
    ],
)
def test_worker_cli_finds_the_pool_to_patch_for(args: tuple[str, ...], pool: str | None) -> None:
    assert _pool_option(args) == pool
