"""Tenant tasks vs the tasks of a plain Celery app (no flask-tenant-jobs), on Redis.

* Throughput: two solo worker subprocesses, ``flask tenant-jobs worker`` of the bench
  app and ``celery worker`` of the plain app, each on its own queue, drain backlogs of
  no-op tasks, tenant and plain batches alternating. Each worker is paused while its
  backlog is sent, so that it is timed alone, not sharing two CPUs with the sender
  (whose cost is the publish row); both are started afresh several times, since one
  worker process runs faster or slower than the next with the same code. The time from
  the worker's resumption to the last result is compared (throughput target >= 0.90x,
  i.e. time <= 1.11x), and, on Linux, the CPU time each worker used per task.
* Publish cost: ``apply_async`` of a tenant task vs a plain app's task to Redis.
* Worker-side overhead: Celery's tracer (what a worker runs per message) for a
  tenant task vs a plain task of a plain Celery app, in-process, in µs (target
  <= 50 µs), with 10 and with 10,000 tenants, and with signed tenant headers
  (``TENANT_JOBS_SIGNING_KEY``: the worker checks an HMAC per task), and for a task
  with ``tenant_concurrency`` (its lease renewed while it runs, freed on Redis after;
  both sides of that row spin a 200 µs body first, as a task works between two
  releases: the worker sends a release and reads its answer at the next one).
* Fan-out: ``delay_for_each_tenant`` over 10,000 tenants (seconds).

``BENCH_REDIS_URL`` names the Redis database (default ``redis://127.0.0.1:6379/9``);
it is flushed. Without Redis only the in-process rows run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

from celery.app.trace import build_tracer

from . import Row, compare, redis_reachable

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
BATCH = int(os.environ.get("BENCH_TASKS", "2000"))
ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT_TARGET = 1 / 0.90
#: How often both throughput workers are started afresh, and the batches each drains.
LAUNCHES = int(os.environ.get("BENCH_WORKER_LAUNCHES", "3"))
BATCHES_PER_LAUNCH = 3
OVERHEAD_TARGET_US = 50.0
#: Whether the worker's CPU time can be read (Linux ``/proc``).
PROC = Path("/proc/self/stat").exists()
#: The seconds each task of the limit row works before the tracer runs.
LIMIT_TASK_BODY = 0.0002


def _tracer_rows() -> list[Row]:
    """Per-message worker work: tenant task vs a plain task of a plain Celery app."""
    from bench import jobs_app

    def tracer(task: t.Any, request: dict[str, t.Any]) -> t.Callable[[], object]:
        trace = build_tracer(task.name, task, app=task.app, eager=False, propagate=False)

        def run() -> object:
            return trace("id", (), {}, dict(request))

        return run

    base = {"id": "id", "delivery_info": {}, "ignore_result": True}
    baseline = tracer(jobs_app.plain.tasks["bench.jobs_app.plain_noop"], base)
    rows = []
    tracers = {}
    for tenants, signing in ((10, False), (10_000, False), (10, True)):
        app = jobs_app.create_app(tenants=tenants, broker_url="memory://", signing=signing)
        celery_app = app.extensions["celery"]
        task = celery_app.tasks["bench.jobs_app.tenant_noop"]
        tenant = jobs_app.tenant_name(tenants // 2)
        headers = {"tenant_for_job": tenant}
        if signing:
            headers["tenant_for_job_signature"] = celery_app.tenant_signer.sign(
                task.name, "id", tenant
            )
        measured = tracer(task, {**base, **headers})
        assert measured().info is None, "the tenant task failed: the row would time an error"
        tracers[tenants, signing] = measured
        what = ", signing on" if signing else ""
        row = compare(f"worker-side per task, {tenants:,} tenants{what}", baseline, measured,
                      number=5000)
        overhead = row.measured_us - row.baseline_us
        verdict = "met" if overhead <= OVERHEAD_TARGET_US else "MISSED"
        name = f"{row.name}: +{overhead:.1f} µs (target <= {OVERHEAD_TARGET_US:.0f} µs, {verdict})"
        rows.append(Row(name, row.baseline_us, row.measured_us, row.ratio, None))
    signed = compare("worker-side per task, 10 tenants: signing on vs off", tracers[10, False],
                     tracers[10, True], number=5000)
    rows.append(Row(f"{signed.name}: {signed.measured_us - signed.baseline_us:+.1f} µs",
                    signed.baseline_us, signed.measured_us, signed.ratio, None))
    if redis_reachable(REDIS_URL):
        rows.append(_limit_row(tracers[10, False]))
    return rows


def _limit_row(unlimited: t.Callable[[], object]) -> Row:
    """A task with ``tenant_concurrency`` vs the same without, in the worker: the lease the
    transport took is renewed while the task runs and freed after it (one Redis script)."""
    from bench import jobs_app

    app = jobs_app.create_app(tenants=10, broker_url=REDIS_URL, fair=True)
    task = app.extensions["celery"].tasks["bench.jobs_app.capped_noop"]
    tenant = jobs_app.tenant_name(5)
    # what the transport puts on a delivered message: limit key, fencing token, queue
    lease = f"{task.name}\n{tenant}\rbench-lease-token\rcelery"
    build = build_tracer(task.name, task, app=task.app, eager=False, propagate=False)
    request = {"id": "id", "delivery_info": {}, "ignore_result": True,
               "tenant_for_job": tenant, "tenant_jobs_lease": lease}

    def capped() -> object:
        return build("id", (), {}, dict(request))

    def after_body(run: t.Callable[[], object]) -> t.Callable[[], object]:
        def task() -> object:
            _busy(LIMIT_TASK_BODY)
            return run()

        return task

    assert capped().info is None, "the capped task failed: the row would time an error"
    row = compare(f"worker-side per task, 10 tenants, a body of {LIMIT_TASK_BODY * 1e6:.0f} µs: "
                  "tenant_concurrency=2 vs no limit (the lease freed on Redis)",
                  after_body(unlimited), after_body(capped), number=1000)
    return Row(f"{row.name}: {row.measured_us - row.baseline_us:+.1f} µs", row.baseline_us,
               row.measured_us, row.ratio, None)


def _busy(seconds: float) -> None:
    """Work (spin) for ``seconds``: a task body, during which Redis answers the last release."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


#: How each side's worker is started: the bench app's ``flask tenant-jobs worker``, and
#: ``celery worker`` of the plain Celery app; each on a queue of its own.
TENANT_WORKER = ["-m", "flask", "--app", "bench.jobs_app:create_app()", "tenant-jobs", "worker"]
PLAIN_WORKER = ["-m", "celery", "-A", "bench.jobs_app:plain", "worker"]


class _Worker:
    """A solo worker subprocess (``command``, see above) consuming ``queue``."""

    def __init__(self, command: list[str], queue: str) -> None:
        env = {**os.environ, "BENCH_BROKER_URL": REDIS_URL, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, *command, "-P", "solo", "-l", "warning", "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-Q", queue],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the worker has used so far, from ``/proc``."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def pause(self) -> None:
        """Stop the worker from running (``SIGSTOP``) until :meth:`resume`."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused worker run again (``SIGCONT``)."""
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _throughput_rows(tenant_noop: t.Any, plain_noop: t.Any) -> list[Row]:
    """A backlog of ``BATCH`` no-op tasks drained by one solo worker, tenant vs plain: the
    time from the worker's resumption to the last result, and the worker's CPU time.

    Each side's worker is paused (``SIGSTOP``) while its backlog is sent, so the sender
    and the worker do not share the machine's CPUs while it is timed; sides alternate.
    A worker process runs at a speed of its own (its hash seed, its memory layout: the
    same code varied by 10 % from launch to launch), so both workers are started afresh
    ``LAUNCHES`` times, and the best batch of each side over all of them counts.
    """
    sides = {"plain": (plain_noop, PLAIN_WORKER, "bench-plain"),
             "tenant": (tenant_noop, TENANT_WORKER, "bench")}
    wall: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for launch in range(LAUNCHES):
        workers = {side: _Worker(command, queue) for side, (_, command, queue) in sides.items()}
        try:
            for task, _, queue in sides.values():
                task.apply_async(queue=queue).get(timeout=60)  # its worker is up
            for batch in range(BATCHES_PER_LAUNCH):
                order = list(sides) if (launch + batch) % 2 == 0 else list(reversed(sides))
                for side in order:
                    task, _, queue = sides[side]
                    seconds, cpu_seconds = _drain_backlog(task, queue, workers[side])
                    wall[side].append(seconds / (BATCH + 1) * 1e6)
                    cpu[side].append(cpu_seconds / (BATCH + 1) * 1e6)
        finally:
            for worker in workers.values():
                worker.stop()
    batches = f"best of {LAUNCHES * BATCHES_PER_LAUNCH} batches over {LAUNCHES} worker launches"
    plain_us, tenant_us = min(wall["plain"]), min(wall["tenant"])
    rows = [Row(f"throughput: a backlog of {BATCH:,} no-op tasks drained by one worker "
                f"({batches})", plain_us, tenant_us, tenant_us / plain_us, THROUGHPUT_TARGET)]
    if PROC:
        plain_cpu, tenant_cpu = min(cpu["plain"]), min(cpu["tenant"])
        rows.append(Row(f"worker CPU per task (solo, user + system, {batches}): "
                        f"{tenant_cpu - plain_cpu:+.0f} µs",
                        plain_cpu, tenant_cpu, tenant_cpu / plain_cpu, None))
    return rows


def _drain_backlog(task: t.Any, queue: str, worker: _Worker) -> tuple[float, float]:
    """Send ``BATCH`` no-op tasks and one whose result is awaited while ``worker`` is
    paused, then resume it: the seconds until that result, and the worker's CPU seconds."""
    worker.pause()
    try:
        with task.app.producer_or_acquire() as producer:
            for _ in range(BATCH):
                task.apply_async(queue=queue, ignore_result=True, producer=producer)
        last = task.apply_async(queue=queue)
    except BaseException:
        worker.resume()  # a worker left stopped would never be stopped by SIGTERM
        raise
    cpu_before = worker.cpu_seconds() if PROC else 0.0
    start = time.perf_counter()
    worker.resume()
    last.get(timeout=120)
    seconds = time.perf_counter() - start
    return seconds, (worker.cpu_seconds() - cpu_before) if PROC else 0.0


def _redis_rows() -> list[Row]:
    """Throughput through one worker, publish cost, and fan-out over 10,000 tenants; the
    baseline of each is the no-op task of the plain Celery app (through a worker of its
    own for the throughput rows)."""
    from bench import jobs_app

    app = jobs_app.create_app(tenants=10_000, broker_url=REDIS_URL)
    celery_app = app.extensions["celery"]
    tenant_jobs = app.extensions["tenant_jobs"]
    with celery_app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    tenant_noop = celery_app.tasks["bench.jobs_app.tenant_noop"]
    plain_noop = jobs_app.plain_app(REDIS_URL).tasks["bench.jobs_app.plain_noop"]
    with app.app_context(), tenant_jobs.switch(jobs_app.tenant_name(42)):
        rows = _throughput_rows(tenant_noop, plain_noop)

        def publish(task: t.Any) -> t.Callable[[], object]:
            def run() -> object:
                return task.apply_async(queue="bench-publish", ignore_result=True)

            return run

        rows.append(compare("publish: apply_async to Redis", publish(plain_noop),
                            publish(tenant_noop), number=2000, target=None))
        with celery_app.connection_for_write() as connection:
            connection.default_channel.queue_delete("bench-publish")

    with app.app_context():

        def publish_plain_10k() -> object:
            with plain_noop.app.producer_or_acquire() as producer:
                for _ in range(10_000):
                    plain_noop.apply_async(queue="bench-publish", ignore_result=True,
                                           producer=producer)
            return None

        def fan_out_10k() -> object:
            results = tenant_noop.apply_for_each_tenant(queue="bench-publish",
                                                        ignore_result=True)
            assert len(results) == 10_000
            return None

        rows.append(compare("fan-out: apply_for_each_tenant over 10,000 tenants "
                            "vs 10,000 plain sends (µs per batch)",
                            publish_plain_10k, fan_out_10k, number=1, repeat=3))
        with celery_app.connection_for_write() as connection:
            connection.default_channel.queue_delete("bench-publish")
    return rows


def run() -> list[Row]:
    """All job benchmarks (about a minute with Redis)."""
    rows = _tracer_rows()
    if redis_reachable(REDIS_URL):
        rows += _redis_rows()
    else:
        print(f"Redis not reachable at {REDIS_URL}: throughput rows skipped", flush=True)
    return rows
