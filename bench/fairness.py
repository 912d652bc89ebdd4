"""Fair dispatch and per-tenant limits, on real worker subprocesses and Redis.

* Noisy neighbour: tenant ``t000`` enqueues ``BENCH_FLOOD`` (5,000) tasks, then 20
  other tenants enqueue 10 each; the p95 of their time from send to finish, with
  ``TENANT_JOBS_FAIR_DISPATCH`` on, against the same 200 tasks with no flood (target
  <= 2.0x), and against plain Celery (FIFO, no flask-tenant-jobs) under the same
  flood (reported). Total throughput of the flood runs, fair vs FIFO: the time from
  the first send to the last finish (target >= 0.90x, i.e. time <= 1.11x); and fair
  vs flask-tenant-jobs with fair dispatch off (what the transport itself costs).
* Limit overhead: batches of tasks spread over 20 tenants, so that no limit ever
  holds one back, with ``tenant_concurrency`` vs the same task without it, and with
  a ``tenant_rate_limit`` no run reaches vs without it (target <= 1.15x time).
* The limit holds: two worker processes (prefork ``-c 4`` each, 8 slots) run tasks
  of 4 tenants with ``tenant_concurrency=2``; every task counts, in Redis, how many
  of its tenant's tasks run with it; the highest count must be exactly 2 (the same
  tasks without the cap reach more).

Every task works ``BENCH_FAIRNESS_TASK_MS`` (2) milliseconds (a sleep: waiting, like
I/O) on a worker with the prefork pool, ``-c 4``, Celery's default prefetch. The
noisy-neighbour runs take four rounds, the kinds in alternating order, and the best
run of each kind counts; the limit rows alternate many short batches. The workers
are ``flask tenant-jobs worker`` and ``celery worker`` (the baseline) subprocesses on
the bench apps of ``bench/fairness_app.py``. ``python -m bench fairness`` runs it (about
five minutes, so it is not in ``MODULES``).

``BENCH_BROKER_URL`` (the broker, default ``redis://127.0.0.1:6379/10``) and
``BENCH_REDIS_URL`` (what the tasks record, default ``redis://127.0.0.1:6379/9``)
are both flushed. Without Redis it returns no rows.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import typing as t
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis

from flask_tenant_jobs.fair.scripts import ROOT as FAIR_ROOT
from flask_tenant_jobs.fair.transport import LEASE_HEADER
from flask_tenant_jobs.limits import LEASES

from . import Row, compare, fairness_app, redis_reachable

ROOT = Path(__file__).resolve().parent.parent
FLOOD = int(os.environ.get("BENCH_FLOOD", "5000"))
SMALL_TENANTS = 20
SMALL_TASKS = 10
TASK_SECONDS = float(os.environ.get("BENCH_FAIRNESS_TASK_MS", "2")) / 1000
CONCURRENCY = 4
#: Rounds of the noisy-neighbour runs; the kinds take turns in alternating order.
REPEAT = 4
LIMIT_BATCH = int(os.environ.get("BENCH_LIMIT_TASKS", "300"))
#: Batches per side of the limit-overhead rows (short batches, many: the best counts).
LIMIT_REPEAT = 16
#: The limit-holds run: tenants, tasks per tenant, seconds per task.
HOLD_TENANTS, HOLD_TASKS, HOLD_SECONDS = 4, 24, 0.05
P95_TARGET = 2.0
THROUGHPUT_TARGET = 1 / 0.90
OVERHEAD_TARGET = 1.15
#: Give up on a batch when no task finished for this long.
STALL_SECONDS = 60.0


#: ``plain``: plain Celery (FIFO, no flask-tenant-jobs); ``tenant``: flask-tenant-jobs with
#: fair dispatch off (FIFO); ``fair``: with ``TENANT_JOBS_FAIR_DISPATCH`` on.
Kind = t.Literal["plain", "tenant", "fair"]


def queue_of(kind: Kind) -> str:
    """Each kind's workers consume a queue of their own."""
    return f"{fairness_app.QUEUE}-{kind}"


class WorkerProcess:
    """A worker subprocess of ``kind`` in its own session (stopping it stops its pool)."""

    def __init__(self, kind: Kind, log_path: Path) -> None:
        if kind == "plain":
            argv = [sys.executable, "-m", "celery", "-A", "bench.fairness_app:plain", "worker"]
        else:
            argv = [sys.executable, "-m", "flask", "--app", "bench.fairness_app:create_app()",
                    "tenant-jobs", "worker"]
        self.hostname = f"bench-{kind}-{uuid.uuid4().hex[:8]}@localhost"
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [*argv, "-P", "prefork", "-c", str(CONCURRENCY), "-Q", queue_of(kind),
                 "-n", self.hostname, "-l", "warning", "--without-gossip", "--without-mingle",
                 "--without-heartbeat"],
                cwd=ROOT, env=_env(kind), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Ping it until it answers (the baseline app's control: the same broker)."""
        deadline = time.monotonic() + timeout
        while not fairness_app.plain.control.ping(destination=[self.hostname], timeout=1.0):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready in {timeout:.0f}s:\n{self.log()}")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"the worker exited ({self.popen.returncode}):\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL whatever is left of its process group."""
        with suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(20)
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


def _env(kind: Kind) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    env.update(
        PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", BENCH_FAIR="1" if kind == "fair" else "0",
        BENCH_BROKER_URL=fairness_app.broker_url(),
        BENCH_REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"),
    )
    return env


@dataclass
class Batch:
    """What one batch of tasks showed: every task's seconds from send to finish."""

    latencies: dict[str, float]
    first_sent: float
    last_finished: float

    @property
    def seconds(self) -> float:
        return self.last_finished - self.first_sent

    def p95(self, prefix: str) -> float:
        """The 95th percentile latency of the tasks whose label starts with ``prefix``."""
        values = sorted(v for label, v in self.latencies.items() if label.startswith(prefix))
        return values[max(0, math.ceil(0.95 * len(values)) - 1)]


class Bench:
    """Sends batches to the workers of one kind or another, reads what the tasks recorded.

    Workers of every kind needed run at once (idle ones wait on their own queue), so
    that the runs of the kinds can alternate: load from other processes then falls on
    every side alike.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.records = fairness_app.records()
        self.broker = redis.Redis.from_url(fairness_app.broker_url())
        self.apps = {"tenant": fairness_app.create_app(fair=False),
                     "fair": fairness_app.create_app(fair=True)}  # fmt: skip
        self.running: list[WorkerProcess] = []

    def flush(self) -> None:
        self.records.flushdb()
        self.broker.flushdb()

    def close(self) -> None:
        self.flush()
        for app in self.apps.values():
            app.extensions["celery"].close()

    @contextmanager
    def workers(self, kinds: t.Mapping[Kind, int]) -> Iterator[None]:
        """Run ``count`` workers of each kind for the block."""
        self.flush()
        self.running = [WorkerProcess(kind, self.log_dir / f"worker-{kind}-{i}.log")
                        for kind, count in kinds.items() for i in range(count)]  # fmt: skip
        try:
            for worker in self.running:
                worker.wait_ready()
            yield
        finally:
            for worker in self.running:
                worker.stop()
            self.running = []

    def send(
        self,
        kind: Kind,
        task_name: str,
        tasks: Sequence[tuple[str, str]],
        seconds: float = TASK_SECONDS,
    ) -> Batch:
        """Send ``(tenant, label)`` tasks that work ``seconds`` each, in order, to the
        workers of ``kind``; wait until all of them finished."""
        self.records.delete(fairness_app.FINISHED)
        sent: dict[str, float] = {}
        queue = queue_of(kind)
        if kind == "plain":
            plain = fairness_app.plain.tasks[f"bench.fairness_app.plain_{task_name}"]
            with fairness_app.plain.producer_or_acquire() as producer:
                for _tenant, label in tasks:
                    sent[label] = time.time()
                    plain.apply_async((label, seconds), queue=queue, producer=producer)
        else:
            app = self.apps[kind]
            celery_app = app.extensions["celery"]
            task = celery_app.tasks[f"bench.fairness_app.{task_name}"]
            switch = app.extensions["tenant_jobs"].switch
            with app.app_context(), celery_app.producer_or_acquire() as producer:
                for tenant, label in tasks:
                    with switch(tenant):
                        sent[label] = time.time()
                        task.apply_async((label, seconds), queue=queue, producer=producer)
        finished = self._wait(len(tasks))
        return Batch(
            {label: finished[label] - sent[label] for label in sent},
            min(sent.values()),
            max(finished.values()),
        )

    def _wait(self, count: int) -> dict[str, float]:
        last_progress, done = time.monotonic(), 0
        while done < count:
            time.sleep(0.02)
            now_done = t.cast(int, self.records.llen(fairness_app.FINISHED))
            if now_done != done:
                done, last_progress = now_done, time.monotonic()
            for worker in self.running:
                worker.check_alive()
            if time.monotonic() - last_progress > STALL_SECONDS:
                logs = "\n".join(w.log() for w in self.running)
                raise RuntimeError(f"{count - done} of {count} tasks never finished:\n{logs}")
        finished = {}
        for item in t.cast(list[bytes], self.records.lrange(fairness_app.FINISHED, 0, -1)):
            label, _, at = item.decode().partition(" ")
            finished[label] = float(at)
        return finished


def small_tasks() -> list[tuple[str, str]]:
    """The 20 tenants' 10 tasks each, tenant after tenant."""
    return [
        (fairness_app.tenant_name(i), f"s{i:03d}-{j}")
        for i in range(1, SMALL_TENANTS + 1)
        for j in range(SMALL_TASKS)
    ]


def flood_tasks() -> list[tuple[str, str]]:
    """``t000``'s flood, followed by the 20 tenants' tasks."""
    return [(fairness_app.tenant_name(0), f"f{i}") for i in range(FLOOD)] + small_tasks()


@dataclass
class NoisyNeighbour:
    """The best of a kind's runs: p95 of the 20 tenants' tasks, flood run seconds."""

    quiet_p95: float = math.inf
    flood_p95: float = math.inf
    flood_seconds: float = math.inf

    def add(self, quiet: Batch | None, flooded: Batch) -> None:
        if quiet is not None:
            self.quiet_p95 = min(self.quiet_p95, quiet.p95("s"))
        self.flood_p95 = min(self.flood_p95, flooded.p95("s"))
        self.flood_seconds = min(self.flood_seconds, flooded.seconds)


def noisy_neighbour(bench: Bench) -> dict[Kind, NoisyNeighbour]:
    """Runs with and without the flood on plain Celery and fair dispatch, and with the
    flood on flask-tenant-jobs without fair dispatch, kind after kind, :data:`REPEAT`
    times; the order of the kinds alternates, so that none always runs first (on a
    worker idle since its last run) or right after another kind's flood."""
    kinds: tuple[Kind, ...] = ("plain", "fair", "tenant")
    found = {kind: NoisyNeighbour() for kind in kinds}
    with bench.workers({kind: 1 for kind in kinds}):
        for kind in kinds:
            bench.send(kind, "work", small_tasks())  # warm up
        for round_ in range(REPEAT):
            for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                quiet = bench.send(kind, "work", small_tasks()) if kind != "tenant" else None
                found[kind].add(quiet, bench.send(kind, "work", flood_tasks()))
    return found


def noisy_neighbour_rows(bench: Bench) -> list[Row]:
    found = noisy_neighbour(bench)
    fifo, fair, tenant = found["plain"], found["fair"], found["tenant"]
    total = FLOOD + SMALL_TENANTS * SMALL_TASKS
    work = f"{TASK_SECONDS * 1000:g} ms tasks, prefork -c {CONCURRENCY}"
    us = 1e6
    print(
        f"\nnoisy neighbour ({FLOOD:,} tasks of t000, then {SMALL_TENANTS} tenants x "
        f"{SMALL_TASKS}; {work}): p95 of the {SMALL_TENANTS} tenants' tasks\n"
        f"  plain Celery (FIFO): no flood {fifo.quiet_p95 * 1000:.0f} ms, flood "
        f"{fifo.flood_p95 * 1000:.0f} ms; {total:,} tasks in {fifo.flood_seconds:.2f} s\n"
        f"  fair dispatch:       no flood {fair.quiet_p95 * 1000:.0f} ms, flood "
        f"{fair.flood_p95 * 1000:.0f} ms; {total:,} tasks in {fair.flood_seconds:.2f} s\n"
        f"  flask-tenant-jobs without fair dispatch (FIFO): flood "
        f"{tenant.flood_p95 * 1000:.0f} ms; {total:,} tasks in {tenant.flood_seconds:.2f} s",
        flush=True,
    )
    return [
        Row(f"noisy neighbour, p95 of 20 tenants: fair under a {FLOOD:,}-task flood vs fair "
            f"with no flood ({work}; µs)", fair.quiet_p95 * us, fair.flood_p95 * us,
            fair.flood_p95 / fair.quiet_p95, P95_TARGET),
        Row(f"noisy neighbour, p95 of 20 tenants: plain Celery FIFO under the flood vs fair "
            f"under the flood ({fifo.flood_p95 / fair.flood_p95:.1f}x faster; µs)",
            fair.flood_p95 * us, fifo.flood_p95 * us, fifo.flood_p95 / fair.flood_p95),
        Row("noisy neighbour, p95 of 20 tenants: plain Celery FIFO under the flood vs with "
            "no flood (µs)", fifo.quiet_p95 * us, fifo.flood_p95 * us,
            fifo.flood_p95 / fifo.quiet_p95),
        Row(f"throughput under the flood: fair vs plain Celery FIFO, {total:,} tasks "
            f"({fifo.flood_seconds / fair.flood_seconds:.2f}x; µs per task)",
            fifo.flood_seconds / total * us, fair.flood_seconds / total * us,
            fair.flood_seconds / fifo.flood_seconds, THROUGHPUT_TARGET),
        Row(f"throughput under the flood: fair vs flask-tenant-jobs without fair dispatch "
            f"(the transport's own cost), {total:,} tasks (µs per task)",
            tenant.flood_seconds / total * us, fair.flood_seconds / total * us,
            fair.flood_seconds / tenant.flood_seconds),
    ]


def spread_tasks(prefix: str) -> list[tuple[str, str]]:
    """:data:`LIMIT_BATCH` tasks over 20 tenants in turn: no limit ever holds one back."""
    return [(fairness_app.tenant_name(1 + i % 20), f"{prefix}{i}") for i in range(LIMIT_BATCH)]


def limit_overhead_rows(bench: Bench) -> list[Row]:
    """Capped vs uncapped and rate-limited vs not, batch against batch, one fair worker."""

    def batch(task_name: str) -> Callable[[], object]:
        return lambda: bench.send("fair", task_name, spread_tasks("o"))

    rows = []
    with bench.workers({"fair": 1}):
        for label, plain, limited in (
            (f"tenant_concurrency={fairness_app.CAP}", "uncapped", "capped"),
            (f"tenant_rate_limit={fairness_app.UNREACHED_RATE!r}", "work", "rated"),
        ):
            row = compare(
                f"limit overhead: {label} vs none, {LIMIT_BATCH:,} {TASK_SECONDS * 1000:g} ms "
                f"tasks of 20 tenants (µs per task)", batch(plain), batch(limited),
                number=1, repeat=LIMIT_REPEAT, target=OVERHEAD_TARGET,
            )
            rows.append(Row(row.name, row.baseline_us / LIMIT_BATCH,
                            row.measured_us / LIMIT_BATCH, row.ratio, row.target))
    return rows


def hold_tasks() -> list[tuple[str, str]]:
    return [
        (fairness_app.tenant_name(1 + i % HOLD_TENANTS), f"h{i}")
        for i in range(HOLD_TENANTS * HOLD_TASKS)
    ]


def peaks(bench: Bench) -> dict[str, int]:
    raw = t.cast(dict[bytes, bytes], bench.records.hgetall(fairness_app.PEAK))
    return {key.decode(): int(value) for key, value in raw.items()}


def limit_holds_row(bench: Bench) -> Row:
    """Two prefork -c 4 workers: the capped tasks' highest count at once, per tenant."""
    seconds, observed = {}, {}
    with bench.workers({"fair": 2}):
        for name in ("uncapped", "capped"):
            bench.records.delete(fairness_app.PEAK, fairness_app.RUNNING)
            started = time.perf_counter()
            bench.send("fair", name, hold_tasks(), HOLD_SECONDS)
            seconds[name] = time.perf_counter() - started
            observed[name] = peaks(bench)
    cap = fairness_app.CAP
    capped_peak = max(observed["capped"].values())
    verdict = "met" if set(observed["capped"].values()) == {cap} else "MISSED"
    tasks = HOLD_TENANTS * HOLD_TASKS
    return Row(
        f"limit holds: tenant_concurrency={cap}, 2 workers prefork -c {CONCURRENCY}, "
        f"{HOLD_TENANTS} tenants x {HOLD_TASKS} {HOLD_SECONDS * 1000:g} ms tasks: max "
        f"concurrent per tenant {capped_peak} (each tenant: "
        f"{sorted(observed['capped'].values())}; == {cap}: {verdict}; uncapped: "
        f"{max(observed['uncapped'].values())}) (µs per task, uncapped vs capped)",
        seconds["uncapped"] / tasks * 1e6, seconds["capped"] / tasks * 1e6,
        seconds["capped"] / seconds["uncapped"],
    )


def transport_rows(bench: Bench) -> list[Row]:
    """The broker's part alone, in this process: publishing a tenant task, and taking one
    message off the queue, with fair dispatch vs without (kombu's Redis transport)."""
    queue = f"{fairness_app.QUEUE}-transport"
    messages = 1000

    def publish(kind: Kind, task_name: str = "work") -> Callable[[], object]:
        app = bench.apps[kind]
        celery_app = app.extensions["celery"]
        task = celery_app.tasks[f"bench.fairness_app.{task_name}"]
        switch = app.extensions["tenant_jobs"].switch

        def run() -> object:
            with app.app_context(), celery_app.producer_or_acquire() as producer:
                for i in range(messages):
                    with switch(fairness_app.tenant_name(1 + i % 20)):
                        task.apply_async((f"p{i}",), queue=queue, producer=producer)
            return None

        return run

    def fetch(kind: Kind, slots: bool = False) -> Callable[[], object]:
        """Take the messages; with ``slots``, also hold and release each one's lease, as
        the pool process running the task does."""
        app = bench.apps[kind]
        celery_app = app.extensions["celery"]
        client = redis.Redis.from_url(fairness_app.broker_url())

        def run() -> object:
            with celery_app.connection_for_read() as connection:
                waiting = connection.SimpleQueue(queue, no_ack=True)
                for _ in range(messages):
                    message = waiting.get(block=False)
                    if slots:
                        lease = message.headers[LEASE_HEADER]
                        LEASES.hold(lease, client, FAIR_ROOT, 60.0)
                        LEASES.release(lease)
                waiting.close()
            return None

        return run

    def refill(kind: Kind, task: str = "work") -> t.Callable[[], t.ContextManager[object]]:
        @contextmanager
        def filled() -> Iterator[None]:
            publish(kind, task)()
            yield

        return filled

    bench.flush()
    rows = [
        compare("transport: publish a tenant task, fair dispatch vs kombu's Redis transport "
                "(µs per message)", publish("tenant"), publish("fair"), number=1,
                repeat=LIMIT_REPEAT),
    ]
    bench.flush()
    rows.append(compare(
        "transport: take a tenant task off the queue, fair dispatch vs kombu's Redis "
        "transport (µs per message)", fetch("tenant"), fetch("fair"), number=1, repeat=LIMIT_REPEAT,
        baseline_context=refill("tenant"), measured_context=refill("fair"),
    ))
    bench.flush()
    rows.append(compare(
        "transport: take a task with tenant_concurrency off the queue, hold and release its "
        "slot, vs a task without a limit, fair dispatch, tasks of 20 tenants (µs per message)",
        fetch("fair"), fetch("fair", slots=True), number=1, repeat=LIMIT_REPEAT,
        baseline_context=refill("fair"), measured_context=refill("fair", "wide"),
    ))
    bench.flush()
    return [Row(r.name, r.baseline_us / messages, r.measured_us / messages, r.ratio)
            for r in rows]


def run() -> list[Row]:
    """All fairness benchmarks (about five minutes)."""
    if not redis_reachable(fairness_app.broker_url()):
        print(f"Redis not reachable at {fairness_app.broker_url()}: fairness rows skipped")
        return []
    bench = Bench(Path(tempfile.mkdtemp(prefix="ftj-bench-fairness-")))
    try:
        rows = noisy_neighbour_rows(bench)
        rows += transport_rows(bench)
        rows += limit_overhead_rows(bench)
        rows.append(limit_holds_row(bench))
    finally:
        bench.close()
    return rows
