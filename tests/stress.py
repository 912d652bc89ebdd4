"""Isolation under load: interleaved tenant tasks on real worker subprocesses.

The engine of ``tests/test_stress.py`` (CI size) and ``python -m bench stress``
(full size). For each strategy combination (:data:`STRATEGIES`: column, schema,
and column with row-level security, without and with ``text()`` SQL) and pool
(prefork, threads, gevent), one ``flask tenant-jobs worker -P <pool> -c <n>`` subprocess on Redis
(broker and results) and PostgreSQL runs ``tasks`` tasks sent in a random
order from ``tenants`` tenants. Each task (``tests.stress_app.read_write``)

* inserts a row (recording the tenant the sender meant and the one it believed),
* reads its tenant's newest rows,
* ``session.get()``\\s a random primary key (with the column strategy mostly
  another tenant's row, which must not be returned) and
* updates the row with that key through an ORM ``UPDATE`` (which must only
  ever reach its own tenant's row),

and reports the tenant of every row it saw. Afterwards the rows are read back
with a plain SQLAlchemy engine (no tenant scoping at all) and checked: every
task's row is there exactly once, in the place of the tenant it was sent for,
and no update reached another tenant's row.

With ``column+rls`` the tables get their row-level security policies and the
worker connects as a role made for the run (neither superuser nor ``BYPASSRLS``);
``column+rls+sql`` adds, in every task, ``text()`` reads and an update that name
no tenant, and an insert of a row for another tenant that the database must refuse.
With ``column+fair`` the worker delivers through fair dispatch
(``TENANT_JOBS_FAIR_DISPATCH``) and the tasks carry ``tenant_concurrency``
(``tests.stress_app.capped_read_write``): each counts in Redis how many tasks of its
tenant run with it, and the highest count must not exceed the cap.

The schema strategy's schemas are made with ``tenant_jobs.create`` (format
:data:`SCHEMA_FORMAT`) and dropped afterwards; the column strategy's tables are
created and dropped too.
"""

from __future__ import annotations

import json
import random
import time
import typing as t
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
import sqlalchemy as sa

from bench.rls_role import app_role
from tests import stress_app
from tests.worker_processes import Worker, subprocess_env

#: pool -> concurrency
POOLS: dict[str, int] = {"prefork": 2, "threads": 8, "gevent": 50}
#: The strategy combinations: ``+rls`` turns ``TENANT_JOBS_RLS`` on (the worker connects
#: as a role that row-level security applies to), ``+sql`` makes the tasks also run
#: ``text()`` SQL that names no tenant and try to insert rows for another tenant,
#: ``+fair`` turns ``TENANT_JOBS_FAIR_DISPATCH`` on and sends tasks with
#: ``tenant_concurrency`` (:data:`tests.stress_app.CAP` at once per tenant).
STRATEGIES = ("column", "schema", "column+rls", "column+rls+sql", "column+fair")
SCHEMA_FORMAT = "ftjstress_{tenant}"
APP = "tests.stress_app:create_app()"
#: Give up waiting for results when none arrived for this long (the worker is stuck).
STALL_SECONDS = 60.0


def base_strategy(strategy: str) -> str:
    """``TENANT_JOBS_STRATEGY`` of a combination (``column+rls`` -> ``column``)."""
    return strategy.split("+", 1)[0]


def is_rls(strategy: str) -> bool:
    """Whether a combination has row-level security on."""
    return "+rls" in strategy


def is_fair(strategy: str) -> bool:
    """Whether a combination has fair dispatch and a per-tenant cap on."""
    return "+fair" in strategy


@dataclass
class Outcome:
    """What one pool x strategy run showed."""

    pool: str
    concurrency: int
    strategy: str
    tenants: int
    sent: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    wrong_tenant: int = 0
    rows_read: int = 0
    cross_reads: int = 0
    cross_writes: int = 0
    seconds: float = 0.0
    #: With ``+fair``: the cap, and the most tasks of one tenant seen running at once.
    cap: int | None = None
    peak: int | None = None
    #: Descriptions of what went wrong (the first ones of each kind).
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.completed == self.sent
            and not (self.failed or self.lost or self.wrong_tenant)
            and not (self.cross_reads or self.cross_writes)
            and not (self.cap is not None and (self.peak or 0) > self.cap)
            and not self.problems
        )

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


def format_table(outcomes: Sequence[Outcome]) -> str:
    """The outcomes as a Markdown table."""
    lines = [
        "| pool | strategy | tenants | tasks sent | completed | lost | failed "
        "| ran in another tenant | rows read | cross-tenant reads | cross-tenant writes "
        "| most at once per tenant (cap) | seconds | tasks/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        rate = o.completed / o.seconds if o.seconds else 0.0
        at_once = "-" if o.cap is None else f"{o.peak} ({o.cap})"
        lines.append(
            f"| {o.pool} (-c {o.concurrency}) | {o.strategy} | {o.tenants} | {o.sent:,} "
            f"| {o.completed:,} | {o.lost:,} | {o.failed:,} | {o.wrong_tenant:,} | {o.rows_read:,} "
            f"| {o.cross_reads:,} | {o.cross_writes:,} | {at_once} | {o.seconds:.1f} "
            f"| {rate:.0f} |"
        )
    return "\n".join(lines)


@dataclass
class Sent:
    task_id: str
    label: str
    tenant: str


def check_results(
    sent: list[Sent], results: dict[str, dict[str, t.Any]], outcome: Outcome
) -> set[str]:
    """Count the tasks that succeeded in their tenant and the rows they read from
    another; return the labels of the completed tasks."""
    completed = set()
    for s in sent:
        meta = results.get(s.task_id)
        if meta is None:
            outcome.lost += 1
            outcome.problem(f"{s.label}: no result")
            continue
        if meta.get("status") != "SUCCESS":
            outcome.failed += 1
            outcome.problem(f"{s.label}: {meta.get('status')} {meta.get('result')!r}")
            continue
        value = meta["result"]
        wrong = False
        if (value["tenant"], value["header"], value["label"]) != (s.tenant, s.tenant, s.label):
            outcome.wrong_tenant += 1
            outcome.problem(f"{s.label} sent in {s.tenant} ran as {value!r}")
            wrong = True
        for row_tenants in value["seen"]:
            outcome.rows_read += 1
            if any(tenant != s.tenant for tenant in row_tenants):
                outcome.cross_reads += 1
                outcome.problem(f"{s.label} in {s.tenant} read a row of {row_tenants}")
        if value.get("forged"):
            outcome.cross_writes += 1
            outcome.problem(f"{s.label} in {s.tenant} inserted a row for another tenant")
        if not wrong:
            outcome.completed += 1
            completed.add(s.label)
    return completed


def check_rows(
    sent: list[Sent],
    completed: set[str],
    rows: t.Iterable[tuple[str, str, str, str | None, str]],
    outcome: Outcome,
) -> None:
    """Count misplaced, missing and doubled rows, and rows updated by another tenant's task.

    ``rows`` are ``(label, place, owner, believed, touched_by)`` read without any scoping;
    ``completed`` (from :func:`check_results`) loses the tasks whose row is missing.
    """
    by_label: dict[str, list[tuple[str, str, str | None, str]]] = {}
    for row in rows:
        by_label.setdefault(row[0], []).append(row[1:])
        place, owner, believed, touched_by = row[1:]
        if not (place == owner == believed):
            outcome.cross_writes += 1
            outcome.problem(f"row {row[0]!r} in {place}: owner {owner}, believed {believed}")
        strangers = {toucher for toucher in touched_by.split() if toucher != place}
        if strangers:
            outcome.cross_writes += 1
            outcome.problem(f"row {row[0]!r} of {place} updated by tasks of {strangers}")
    expected = {s.label: s.tenant for s in sent}
    for label, found in by_label.items():
        if label not in expected:
            outcome.problem(f"a row nobody sent: {label!r} {found}")
        elif len(found) != 1:
            outcome.problem(f"{len(found)} rows for {label!r}: {found}")
    for s in sent:
        if s.label not in by_label:
            outcome.problem(f"{s.label}: no row written")
            if s.label in completed:  # reported success, but its effect is gone: lost
                completed.discard(s.label)
                outcome.completed -= 1
                outcome.lost += 1


class StressRun:
    """Runs the pool x strategy matrix against one PostgreSQL database and Redis database.

    ``redis_url`` names a Redis database of this run's own: it is flushed before
    each combination. ``log_dir`` receives the worker logs.
    """

    def __init__(
        self,
        database_url: str,
        redis_url: str,
        *,
        tenants: int,
        tasks: int,
        log_dir: Path,
        seed: int = 0,
        progress: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.tenants = tenants
        self.names = stress_app.tenant_names(tenants)
        self.tasks = tasks
        self.log_dir = log_dir
        self.seed = seed
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:8]
        self.redis = redis.Redis.from_url(redis_url)
        self.plain = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
        self._roles = ExitStack()
        self._role_url: str | None = None

    def run(
        self, pools: Sequence[str] = tuple(POOLS), strategies: Sequence[str] = STRATEGIES
    ) -> list[Outcome]:
        """Every combination, strategy by strategy; storage is made and dropped per strategy."""
        outcomes = []
        try:
            for strategy in strategies:
                with self.storage(strategy) as app:
                    for pool in pools:
                        outcome = self.run_one(app, pool, strategy)
                        self.progress(format_table([outcome]).splitlines()[-1])
                        outcomes.append(outcome)
        finally:
            self.close()
        return outcomes

    def close(self) -> None:
        """Flush this run's Redis database, close the connections, drop the RLS role."""
        self.redis.flushdb()
        self.redis.close()
        self.plain.dispose()
        self._roles.close()

    def worker_url(self, strategy: str) -> str:
        """The database URL of the worker: with ``+rls``, a role that RLS applies to."""
        if not is_rls(strategy):
            return self.database_url
        if self._role_url is None:
            self._role_url = self._roles.enter_context(app_role(self.database_url))
        return self._role_url

    # -- one combination --------------------------------------------------------------------

    def run_one(self, app: t.Any, pool: str, strategy: str) -> Outcome:
        concurrency = POOLS[pool]
        outcome = Outcome(pool, concurrency, strategy, self.tenants)
        queue = f"ftj-stress-{self.run_id}-{pool}-{strategy}"
        self.redis.flushdb()
        self._clear_rows(strategy)
        env = subprocess_env(
            "TEST_STRESS_",
            **stress_app.env_for(
                database_url=self.worker_url(strategy),
                redis_url=self.redis_url,
                strategy=base_strategy(strategy),
                tenants=self.tenants,
                schema_format=SCHEMA_FORMAT,
                queue=queue,
                rls=is_rls(strategy),
                fair=is_fair(strategy),
            ),
        )
        log_path = self.log_dir / f"worker-{pool}-{strategy}.log"
        worker = Worker(APP, pool, concurrency, env, log_path, extra=["-l", "warning"])
        celery_app = app.extensions["celery"]
        try:
            worker.wait_ready(celery_app, timeout=60)
            started = time.monotonic()
            sent = self._send(app, queue, strategy)
            outcome.sent = len(sent)
            results = self._collect(sent, worker, outcome)
            outcome.seconds = time.monotonic() - started
        finally:
            worker.stop()
        if is_fair(strategy):
            outcome.cap = stress_app.CAP
            outcome.peak = max(stress_app.peaks(self.redis).values(), default=0)
            if outcome.peak > outcome.cap:
                outcome.problem(f"{outcome.peak} tasks of one tenant ran at once "
                                f"(tenant_concurrency={outcome.cap})")
        completed = check_results(sent, results, outcome)
        check_rows(sent, completed, self._all_rows(strategy), outcome)
        if not outcome.ok:
            outcome.problem(f"worker log ({log_path}):\n{worker.log(3000)}")
        return outcome

    def _send(self, app: t.Any, queue: str, strategy: str) -> list[Sent]:
        """Send the tasks in a random tenant order, each inside ``switch(tenant)``."""
        rng = random.Random(f"{self.seed}-{strategy}")
        celery_app = app.extensions["celery"]
        name = "capped_read_write" if is_fair(strategy) else "read_write"
        task = celery_app.tasks[f"tests.stress_app.{name}"]
        per_tenant: Counter[str] = Counter()
        sql = strategy.endswith("+sql")
        sent = []
        with app.app_context(), celery_app.producer_or_acquire() as producer:
            for i in range(self.tasks):
                tenant = rng.choice(self.names)
                per_tenant[tenant] += 1
                # Primary keys are global with the column strategy, per schema otherwise.
                top = i + 1 if base_strategy(strategy) == "column" else per_tenant[tenant]
                label = f"{i}-{tenant}"
                kwargs = {"forge_for": self._another(rng, tenant)} if sql else {}
                with stress_app.tenant_jobs.switch(tenant):
                    result = task.apply_async(
                        (label, tenant, rng.randint(1, top)), kwargs, queue=queue,
                        producer=producer,
                    )
                sent.append(Sent(result.id, label, tenant))
        return sent

    def _another(self, rng: random.Random, tenant: str) -> str:
        """A tenant other than ``tenant``, at random."""
        step = rng.randint(1, len(self.names) - 1)
        return self.names[(self.names.index(tenant) + step) % len(self.names)]

    def _collect(
        self, sent: list[Sent], worker: Worker, outcome: Outcome
    ) -> dict[str, dict[str, t.Any]]:
        """The stored result of every task, read straight from Redis; waits while results
        keep arriving (at most :data:`STALL_SECONDS` without one) and the worker lives."""
        pending = {s.task_id for s in sent}
        results: dict[str, dict[str, t.Any]] = {}
        last_progress = time.monotonic()
        while pending:
            ids = sorted(pending)
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                values = self.redis.mget([f"celery-task-meta-{task_id}" for task_id in chunk])
                for task_id, value in zip(chunk, values, strict=True):
                    if value is not None:
                        results[task_id] = json.loads(value)
                        pending.discard(task_id)
                        last_progress = time.monotonic()
            if not pending:
                break
            if worker.popen.poll() is not None:
                outcome.problem(f"the worker exited ({worker.popen.returncode})")
                break
            if time.monotonic() - last_progress > STALL_SECONDS:
                outcome.problem(f"no result for {STALL_SECONDS:.0f}s; {len(pending)} missing")
                break
            time.sleep(0.2)
        return results

    def _all_rows(self, strategy: str) -> list[tuple[str, str, str, str | None, str]]:
        """``(label, place, owner, believed, touched_by)`` of every stress row; ``place`` is
        the ``tenant_id`` (column) or the tenant whose schema holds the row (schema)."""
        with self.plain.connect() as connection:
            if base_strategy(strategy) == "column":
                query = "SELECT label, tenant_id, owner, believed, touched_by FROM ftj_stress_row"
                return [tuple(row) for row in connection.execute(sa.text(query))]
            rows = []
            for name in self.names:
                table = f'"{SCHEMA_FORMAT.format(tenant=name)}".ftj_stress_schema_row'
                query = f"SELECT label, owner, believed, touched_by FROM {table}"
                for label, owner, believed, touched_by in connection.execute(sa.text(query)):
                    rows.append((label, name, owner, believed, touched_by))
            return rows

    # -- storage ----------------------------------------------------------------------------

    @contextmanager
    def storage(self, strategy: str) -> Iterator[t.Any]:
        """The test-side app of ``strategy``, with its tables (column) or schemas (schema)."""
        app = stress_app.create_app(
            database_url=self.database_url,
            redis_url=self.redis_url,
            strategy=base_strategy(strategy),
            tenants=self.tenants,
            schema_format=SCHEMA_FORMAT,
            rls=is_rls(strategy),
            fair=is_fair(strategy),
        )
        db, tenant_jobs = stress_app.db, stress_app.tenant_jobs
        with app.app_context():
            if base_strategy(strategy) == "column":
                db.drop_all()
                db.create_all()
                if is_rls(strategy):
                    tenant_jobs.enable_rls()  # as the tables' owner
            else:
                for name in self.names:
                    tenant_jobs.drop(name)  # leftovers of an interrupted run
                    tenant_jobs.create(name)
            db.session.remove()
        try:
            yield app
        finally:
            with app.app_context():
                db.session.remove()
                if base_strategy(strategy) == "column":
                    db.drop_all()
                else:
                    for name in self.names:
                        tenant_jobs.drop(name)
                db.engine.dispose()
            app.extensions["celery"].close()

    def _clear_rows(self, strategy: str) -> None:
        with self.plain.begin() as connection:
            if base_strategy(strategy) == "column":
                connection.execute(sa.text("TRUNCATE ftj_stress_row RESTART IDENTITY"))
                return
            for name in self.names:
                table = f'"{SCHEMA_FORMAT.format(tenant=name)}".ftj_stress_schema_row'
                connection.execute(sa.text(f"TRUNCATE {table} RESTART IDENTITY"))
