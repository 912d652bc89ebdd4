"""Tenant tasks vs the tasks of a plain Celery app (no flask-tenant-jobs), on Redis.

* Throughput: two solo worker subprocesses, ``flask tenant-jobs worker`` of the bench
  app and ``celery worker`` of the plain app, each on its own queue, drain batches of
  no-op tasks, tenant and plain batches interleaved; the time from the first publish
  to the last result is compared (throughput target >= 0.90x, i.e. time <= 1.11x),
  and, on Linux, the CPU time each worker used per task (steadier than the wall clock
  on a shared machine: the ticks a process used, not what others did meanwhile).
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

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _redis_rows() -> list[Row]:
    """Throughput through one worker, publish cost, and fan-out over 10,000 tenants; the
    baseline of each is the no-op task of the plain Celery app, through a worker of its own."""
    from bench import jobs_app

    app = jobs_app.create_app(tenants=10_000, broker_url=REDIS_URL)
    celery_app = app.extensions["celery"]
    tenant_jobs = app.extensions["tenant_jobs"]
    with celery_app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    tenant_noop = celery_app.tasks["bench.jobs_app.tenant_noop"]
    plain_noop = jobs_app.plain_app(REDIS_URL).tasks["bench.jobs_app.plain_noop"]
    tenant_worker = _Worker(TENANT_WORKER, "bench")
    plain_worker = _Worker(PLAIN_WORKER, "bench-plain")
    workers = [tenant_worker, plain_worker]
    rows = []
    try:
        with app.app_context(), tenant_jobs.switch(jobs_app.tenant_name(42)):
            for task, queue in ((plain_noop, "bench-plain"), (tenant_noop, "bench")):
                task.apply_async(queue=queue).get(timeout=60)  # its worker is up
            cpu: dict[str, list[float]] = {"bench": [], "bench-plain": []}

            def drain(task: t.Any, queue: str, worker: _Worker) -> t.Callable[[], object]:
                def run() -> object:
                    before = worker.cpu_seconds() if PROC else 0.0
                    with task.app.producer_or_acquire() as producer:
                        for _ in range(BATCH):
                            task.apply_async(queue=queue, ignore_result=True,
                                             producer=producer)
                    result = task.apply_async(queue=queue).get(timeout=120)
                    if PROC:
                        cpu[queue].append(worker.cpu_seconds() - before)
                    return result

                return run

            timed = compare(f"throughput: {BATCH:,} no-op tasks through one worker",
                            drain(plain_noop, "bench-plain", plain_worker),
                            drain(tenant_noop, "bench", tenant_worker),
                            number=1, repeat=7, target=THROUGHPUT_TARGET)
            rows.append(_per_task(timed, BATCH + 1))
            if PROC:
                plain_cpu, tenant_cpu = (min(cpu[q]) / (BATCH + 1) * 1e6
                                         for q in ("bench-plain", "bench"))
                rows.append(Row(f"worker CPU per task (solo, user + system, best of 7 "
                                f"batches): {tenant_cpu - plain_cpu:+.0f} µs",
                                plain_cpu, tenant_cpu, tenant_cpu / plain_cpu, None))

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
    finally:
        for worker in workers:
            worker.stop()
    return rows


def _per_task(row: Row, tasks: int) -> Row:
    """A batch row expressed per task."""
    return Row(row.name, row.baseline_us / tasks, row.measured_us / tasks, row.ratio, row.target)


def run() -> list[Row]:
    """All job benchmarks (about a minute with Redis)."""
    rows = _tracer_rows()
    if redis_reachable(REDIS_URL):
        rows += _redis_rows()
    else:
        print(f"Redis not reachable at {REDIS_URL}: throughput rows skipped", flush=True)
    return rows
