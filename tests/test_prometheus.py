"""Prometheus: per-tenant job metrics, in one process and across prefork pool processes.

In-process, tasks run eagerly and in a real worker (solo pool, a thread of this process)
on Redis; the metrics are read from prometheus-client's default registry, as differences
over each test. Across processes, a ``flask tenant-jobs worker -P prefork -c 2``
subprocess runs with ``PROMETHEUS_MULTIPROC_DIR`` set and serves the metrics of both
pool processes from its main process, scraped over HTTP. Redis database
``TEST_PROMETHEUS_REDIS_DB`` (default 3) is flushed and used.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import typing as t
import urllib.request
from pathlib import Path

import pytest
import redis
from blinker import Namespace
from celery import chain
from celery.contrib.testing.worker import start_worker
from flask import Flask
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from flask_tenant_jobs import current_tenant, signals
from flask_tenant_jobs.integrations import prometheus
from flask_tenant_jobs.integrations.prometheus import OTHER, TenantLabels, record_held_back

from . import observability_app
from .worker_processes import Worker, redis_db_url, subprocess_env, wait_until

pytestmark = pytest.mark.filterwarnings(
    # celery's Redis result backend calls redis-py's deprecated setex
    "ignore:Call to deprecated setex:DeprecationWarning"
)
REDIS_DB = int(os.environ.get("TEST_PROMETHEUS_REDIS_DB", "3"))
QUEUE = "flask-tenant-jobs-prometheus"
TIMEOUT = 20.0
COUNTERS = ("sent", "started", "succeeded", "failed", "retried", "held_back")


class Metrics:
    """The per-tenant metrics of one task, as differences since the object was made."""

    def __init__(self, task: str) -> None:
        self.task = task
        self._start = self._read()

    def _read(self) -> dict[tuple[str, str], float]:
        values = {}
        for tenant in (*observability_app.TENANTS, OTHER):
            labels = {"tenant": tenant, "task": self.task}
            for counter in COUNTERS:
                name = f"tenant_jobs_tasks_{counter}_total"
                values[counter, tenant] = REGISTRY.get_sample_value(name, labels) or 0.0
            for histogram in ("queue_wait", "run"):
                for part in ("count", "sum"):
                    name = f"tenant_jobs_task_{histogram}_seconds_{part}"
                    value = REGISTRY.get_sample_value(name, labels) or 0.0
                    values[f"{histogram}_{part}", tenant] = value
        return values

    def changes(self) -> dict[str, dict[str, float]]:
        """``{metric: {tenant: change}}`` of the metrics that changed."""
        found: dict[str, dict[str, float]] = {}
        for (metric, tenant), value in self._read().items():
            change = value - self._start[metric, tenant]
            if change:
                found.setdefault(metric, {})[tenant] = round(change, 6)
        return found

    def counts(self) -> dict[str, dict[str, int]]:
        """The changes of the counters and of the histograms' counts only."""
        return {
            metric: {tenant: int(value) for tenant, value in by_tenant.items()}
            for metric, by_tenant in self.changes().items()
            if not metric.endswith("_sum")
        }


@pytest.fixture(scope="module", params=["eager", "worker"])
def mode_app(request: pytest.FixtureRequest) -> t.Iterator[Flask]:
    if request.param == "eager":
        yield observability_app.create_app(CELERY={"task_always_eager": True})
        return
    url = redis_db_url(request.getfixturevalue("redis_url"), REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    app = observability_app.create_app(
        CELERY={"broker_url": url, "result_backend": url, "task_default_queue": QUEUE,
                "worker_enable_remote_control": False},
    )
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        with start_worker(app.extensions["celery"], pool="solo", perform_ping_check=False,
                          shutdown_timeout=30):
            yield app
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


@pytest.fixture
def jobs(mode_app: Flask) -> t.Iterator[Flask]:
    mode_app.extensions["celery"].set_current()
    with mode_app.app_context():
        yield mode_app
        assert current_tenant() is None


def _task(app: Flask, name: str) -> t.Any:
    return app.extensions["celery"].tasks[name]


def _eager(app: Flask) -> bool:
    return bool(app.extensions["celery"].conf.task_always_eager)


def _settled(metrics: Metrics, metric: str, total: int) -> dict[str, dict[str, int]]:
    """The counts once ``metric`` has grown by ``total`` (the worker counts the outcome in
    ``task_postrun``, after the result is stored)."""
    wait_until(lambda: sum(metrics.counts().get(metric, {}).values()) >= total, TIMEOUT,
               f"{metric} += {total}", lambda: str(metrics.counts()))
    return metrics.counts()


def _sent(app: Flask, counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """What ``sent`` should show: nothing is published eagerly."""
    return {} if _eager(app) else {"sent": counts}


def test_a_task_that_succeeds(jobs: Flask) -> None:
    metrics = Metrics("obs.report")
    with observability_app.tenant_jobs.switch("acme"):
        assert _task(jobs, "obs.report").delay().get(timeout=TIMEOUT) == "acme"
    counts = _settled(metrics, "succeeded", 1)
    expected = {"started": {"acme": 1}, "succeeded": {"acme": 1}, "run_count": {"acme": 1},
                **_sent(jobs, {"acme": 1})}
    if not _eager(jobs):
        expected["queue_wait_count"] = {"acme": 1}
    assert counts == expected


def test_retries_and_failures(jobs: Flask) -> None:
    flaky, boom = Metrics("obs.flaky"), Metrics("obs.boom")
    with observability_app.tenant_jobs.switch("globex"):
        assert _task(jobs, "obs.flaky").delay().get(timeout=TIMEOUT) == 2
        result = _task(jobs, "obs.boom").delay()
    with pytest.raises(RuntimeError):
        result.get(timeout=TIMEOUT)
    flaky_counts = _settled(flaky, "succeeded", 1)
    assert flaky_counts["started"] == {"globex": 3}
    assert flaky_counts["retried"] == {"globex": 2}
    assert flaky_counts["run_count"] == {"globex": 3}
    assert flaky_counts.get("sent") == ({"globex": 3} if not _eager(jobs) else None)
    boom_counts = _settled(boom, "failed", 1)
    assert (boom_counts["started"], boom_counts["failed"]) == ({"globex": 1}, {"globex": 1})
    assert "succeeded" not in boom_counts


def test_chains_and_fan_out(jobs: Flask) -> None:
    metrics = Metrics("obs.report")
    report = _task(jobs, "obs.report")
    with observability_app.tenant_jobs.switch("initech"):
        assert chain(report.s(), report.s(), report.s()).delay().get(timeout=TIMEOUT) == "initech"
    for result in report.apply_for_each_tenant():
        result.get(timeout=TIMEOUT)
    counts = _settled(metrics, "succeeded", 6)
    every = {"acme": 1, "globex": 1, "initech": 4}  # three chain steps and one fan-out task
    assert counts["started"] == counts["succeeded"] == every
    assert counts.get("sent") == (every if not _eager(jobs) else None)


def test_plain_tasks_are_not_counted(jobs: Flask) -> None:
    metrics = Metrics("obs.plain_report")
    plain = _task(jobs, "obs.plain_report")
    with observability_app.tenant_jobs.switch("acme"):
        assert plain.delay().get(timeout=TIMEOUT) is None
        assert plain.apply_async(headers={"tenant_for_job": "acme"}).get(timeout=TIMEOUT) is None
    time.sleep(0.2)
    assert metrics.changes() == {}


def test_queue_wait_counts_from_the_eta(jobs: Flask) -> None:
    """A task sent with a countdown waited for its eta, not in the queue."""
    if _eager(jobs):
        pytest.skip("eager runs ignore countdowns")
    metrics = Metrics("obs.report")
    with observability_app.tenant_jobs.switch("acme"):
        assert _task(jobs, "obs.report").apply_async(countdown=1).get(timeout=TIMEOUT) == "acme"
    _settled(metrics, "succeeded", 1)
    changes = metrics.changes()
    assert changes["queue_wait_count"] == {"acme": 1}
    assert changes["queue_wait_sum"]["acme"] < 0.8, changes


def test_held_back_tasks() -> None:
    metrics = Metrics("obs.report")
    record_held_back("obs.report", "globex")
    record_held_back("obs.report", "globex")
    assert metrics.counts() == {"held_back": {"globex": 2}}


def test_held_back_is_counted_from_the_limiter_s_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    """When ``flask_tenant_jobs.signals`` has ``task_held_back``, the counter listens to it."""
    held_back = Namespace().signal("task-held-back")
    monkeypatch.setattr(signals, "task_held_back", held_back, raising=False)
    app = observability_app.create_app()
    metrics = Metrics("obs.report")
    held_back.send(app, task="obs.report", tenant="initech")
    assert metrics.counts() == {"held_back": {"initech": 1}}


def test_the_label_cap() -> None:
    labels = TenantLabels(2)
    assert [labels(name) for name in ("acme", "globex", "initech", "acme", "hooli")] == [
        "acme", "globex", OTHER, "acme", OTHER,
    ]
    assert [TenantLabels(0)("acme")] == [OTHER]


def test_tenants_beyond_the_cap_share_one_label(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus.tenant_label, "_own", {"acme"})
    monkeypatch.setattr(prometheus.tenant_label, "limit", 1)
    app = observability_app.create_app(
        CELERY={"task_always_eager": True}, TENANT_JOBS_METRICS_MAX_TENANTS=1
    )
    metrics = Metrics("obs.report")
    with app.app_context():
        for name in observability_app.TENANTS:
            with observability_app.tenant_jobs.switch(name):
                app.extensions["celery"].tasks["obs.report"].delay()
    assert metrics.counts()["started"] == {"acme": 1, OTHER: 2}


@pytest.mark.parametrize("value", [-1, 2.5, "10", True])
def test_a_bad_cap_is_a_configuration_error(value: object) -> None:
    from flask_tenant_jobs import ConfigurationError

    with pytest.raises(ConfigurationError, match="TENANT_JOBS_METRICS_MAX_TENANTS"):
        observability_app.create_app(TENANT_JOBS_METRICS_MAX_TENANTS=value)


def test_metrics_off(monkeypatch: pytest.MonkeyPatch) -> None:
    app = observability_app.create_app(CELERY={"task_always_eager": True},
                                       TENANT_JOBS_METRICS=False)
    metrics = Metrics("obs.report")
    with app.app_context(), observability_app.tenant_jobs.switch("acme"):
        app.extensions["celery"].tasks["obs.report"].delay()
    assert metrics.changes() == {}


# -- Prefork pool processes (multiprocess mode) --------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, str, str], float]:
    """``(sample name, tenant, task) -> value`` of the tenant-jobs samples served on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, sample.labels.get("tenant", ""), sample.labels.get("task", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("tenant_jobs_")
    }


@pytest.mark.slow
def test_prefork_pool_processes_are_served_together(redis_url: str, tmp_path: Path) -> None:
    url = redis_db_url(redis_url, REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    port = _free_port()
    env = subprocess_env(
        "TEST_OBSERVABILITY_",
        "PROMETHEUS_",
        TEST_OBSERVABILITY_BROKER_URL=url,
        TEST_OBSERVABILITY_BACKEND_URL=url,
        TEST_OBSERVABILITY_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    app = observability_app.create_app(CELERY={"broker_url": url, "result_backend": url})
    celery_app = app.extensions["celery"]
    worker = Worker("tests.observability_app", "prefork", 2, env, tmp_path / "worker.log")
    try:
        worker.wait_ready(celery_app)
        sent = {"acme": 12, "globex": 6, "initech": 2}
        with app.app_context():
            results = []
            for name, count in sent.items():
                with observability_app.tenant_jobs.switch(name):
                    results += [celery_app.tasks["obs.nap"].delay(0.05) for _ in range(count)]
            assert [r.get(timeout=TIMEOUT) for r in results] == [
                name for name, count in sent.items() for _ in range(count)
            ]

        def succeeded() -> dict[str, float]:
            samples = _scrape(port)
            return {tenant: value for (name, tenant, task), value in samples.items()
                    if name == "tenant_jobs_tasks_succeeded_total" and task == "obs.nap"}

        wait_until(lambda: succeeded() == sent, TIMEOUT, "all successes served",
                   lambda: f"{succeeded()}\n{worker.log()}")
        samples = _scrape(port)
        for name, count in sent.items():
            assert samples["tenant_jobs_tasks_started_total", name, "obs.nap"] == count
            assert samples["tenant_jobs_task_run_seconds_count", name, "obs.nap"] == count
            assert samples["tenant_jobs_task_queue_wait_seconds_count", name, "obs.nap"] == count
        writers = {path.name.rsplit("_", 1)[1] for path in metrics_dir.glob("counter_*.db")}
        assert len(writers) == 2, sorted(path.name for path in metrics_dir.iterdir())
    finally:
        worker.stop()
