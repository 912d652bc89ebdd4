"""Prometheus: per-tenant job metrics with prometheus-client.

Installed when ``prometheus-client`` is importable and ``TENANT_JOBS_METRICS`` is
on (the default). The metrics below are labelled ``tenant`` and ``task`` (the
task's name); they count tenant tasks only (plain tasks carry no tenant):

* ``tenant_jobs_tasks_sent_total``: messages published (chain steps, callbacks and
  retries included; eager runs publish nothing);
* ``tenant_jobs_tasks_started_total``, ``..._succeeded_total``, ``..._failed_total``,
  ``..._retried_total``: executions in a worker (or eagerly) and how they ended;
* ``tenant_jobs_tasks_held_back_total``: tasks a per-tenant limit held back;
* ``tenant_jobs_task_queue_wait_seconds``: from publishing (or the ``eta``, if
  later) to the start of the execution;
* ``tenant_jobs_task_run_seconds``: from the start of an execution to its end.

The first ``TENANT_JOBS_METRICS_MAX_TENANTS`` tenants a process sees get a label of
their own; the others share the label ``other``. With prefork workers, set
``PROMETHEUS_MULTIPROC_DIR`` before the worker starts and serve
:func:`metrics_registry` (e.g. with :func:`start_metrics_server`) from the main
process, as prometheus-client's multiprocess mode prescribes.
"""

from __future__ import annotations

import os
import threading
import time
import typing as t
from datetime import datetime
from weakref import WeakSet

from celery import Celery, Task
from celery.signals import before_task_publish, task_postrun, task_prerun, worker_process_shutdown
from flask import Flask
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
)

from .. import context, signals
from ..sending import header_name
from ..tasks import TenantTask

#: The label of the tenants beyond the cap.
OTHER = "other"
#: Message header with the time the message was published (seconds since the epoch).
SENT_AT = "tenant_jobs_sent_at"
#: Request attribute: ``(tenant label, start)`` of the running execution.
_STARTED = "_tenant_jobs_metrics_started"
_LABELS = ("tenant", "task")
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

SENT = Counter("tenant_jobs_tasks_sent", "Tenant task messages published.", _LABELS)
STARTED = Counter("tenant_jobs_tasks_started", "Tenant task executions started.", _LABELS)
SUCCEEDED = Counter("tenant_jobs_tasks_succeeded", "Tenant task executions that succeeded.",
                    _LABELS)
FAILED = Counter("tenant_jobs_tasks_failed", "Tenant task executions that failed.", _LABELS)
RETRIED = Counter("tenant_jobs_tasks_retried", "Tenant task executions that asked for a retry.",
                  _LABELS)
HELD_BACK = Counter("tenant_jobs_tasks_held_back", "Tenant tasks held back by a per-tenant limit.",
                    _LABELS)
QUEUE_WAIT = Histogram("tenant_jobs_task_queue_wait_seconds",
                       "Seconds from publishing a tenant task to the start of its execution.",
                       _LABELS, buckets=_WAIT_BUCKETS)
RUN_TIME = Histogram("tenant_jobs_task_run_seconds", "Seconds a tenant task execution took.",
                     _LABELS)
_OUTCOMES = {"SUCCESS": SUCCEEDED, "FAILURE": FAILED, "RETRY": RETRIED}
#: ``(metric, tenant label, task) -> labelled child``: ``labels()`` costs more than the count.
_children: dict[tuple[t.Any, str, str], t.Any] = {}


class TenantLabels:
    """The ``tenant`` label: the name for the first ``limit`` tenants seen, else ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._own: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str) -> str:
        """The label for ``tenant`` (a new tenant takes a free place, if any is left)."""
        if tenant in self._own:
            return tenant
        with self._lock:
            if len(self._own) < self.limit:
                self._own.add(tenant)
                return tenant
        return OTHER


#: The labels of this process (``TENANT_JOBS_METRICS_MAX_TENANTS`` of the latest app set up).
tenant_label = TenantLabels(100)
_celery_apps: WeakSet[Celery] = WeakSet()


def install(app: Flask, max_tenants: int) -> None:
    """Count ``app``'s tenant tasks: sent here, started and finished in its workers."""
    tenant_label.limit = max_tenants
    celery_app = app.extensions.get("celery")
    if celery_app is None:
        return
    _celery_apps.add(celery_app)
    before_task_publish.connect(_count_sent)
    task_prerun.connect(_count_started)
    task_postrun.connect(_count_finished)
    held_back = getattr(signals, "task_held_back", None)
    if held_back is not None:
        held_back.connect(_count_held_back)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        worker_process_shutdown.connect(_mark_process_dead)


def record_held_back(task: str, tenant: str) -> None:
    """Count one execution of task ``task`` of ``tenant`` held back by a per-tenant limit."""
    _labelled(HELD_BACK, tenant_label(tenant), task).inc()


def metrics_registry() -> CollectorRegistry:
    """The registry to serve: every process's metrics in multiprocess mode, else this one's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve :func:`metrics_registry` over HTTP on ``addr:port`` from a background thread."""
    start_http_server(port, addr, registry=metrics_registry())


def _count_sent(
    sender: str | None = None, headers: dict[str, t.Any] | None = None, **_: t.Any
) -> None:
    """Count a published tenant task and stamp the time it was sent into its headers."""
    tenant = _tenant_of_message(sender, headers)
    if tenant is not None:
        _labelled(SENT, tenant_label(tenant), str(sender)).inc()
        headers[SENT_AT] = time.time()  # type: ignore[index]


def _tenant_of_message(sender: str | None, headers: dict[str, t.Any] | None) -> str | None:
    """The tenant a message of one of our tenant tasks carries (a plain task's carries none,
    whatever its headers say)."""
    if not headers:
        return None
    for celery_app in _celery_apps:
        if isinstance(celery_app.tasks.get(sender), TenantTask):
            tenant = headers.get(header_name(celery_app))
            if isinstance(tenant, str):
                return tenant
    return None


def _count_started(task: Task | None = None, **_: t.Any) -> None:
    """Count an execution that starts in a tenant; observe how long it waited in the queue."""
    tenant = context.get_tenant()
    if tenant is None or getattr(task, "app", None) not in _celery_apps:
        return
    request = task.request  # type: ignore[union-attr]
    label, name = tenant_label(tenant), task.name  # type: ignore[union-attr]
    _labelled(STARTED, label, name).inc()
    waited = _queue_wait(request)
    if waited is not None:
        _labelled(QUEUE_WAIT, label, name).observe(waited)
    setattr(request, _STARTED, (label, time.perf_counter()))


def _count_finished(task: Task | None = None, state: str | None = None, **_: t.Any) -> None:
    """Observe the run time of an execution counted at its start, and count its outcome."""
    started = getattr(getattr(task, "request", None), _STARTED, None)
    if started is None:
        return
    label, start = started
    name = task.name  # type: ignore[union-attr]
    _labelled(RUN_TIME, label, name).observe(time.perf_counter() - start)
    outcome = _OUTCOMES.get(state or "")
    if outcome is not None:
        _labelled(outcome, label, name).inc()


def _count_held_back(sender: t.Any, task: str = "", tenant: str = "", **_: t.Any) -> None:
    """Receive the limiter's ``task_held_back`` signal (keywords ``task`` and ``tenant``)."""
    if task and tenant:
        record_held_back(task, tenant)


def _labelled(metric: t.Any, label: str, task: str) -> t.Any:
    """``metric.labels(label, task)``, made once."""
    key = (metric, label, task)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(label, task)
    return child


def _queue_wait(request: t.Any) -> float | None:
    """Seconds since the message was sent, or since its ``eta`` if that is later."""
    sent_at = getattr(request, SENT_AT, None)
    if not isinstance(sent_at, (int, float)):
        return None
    due = float(sent_at)
    eta = getattr(request, "eta", None)
    if eta:
        due = max(due, datetime.fromisoformat(str(eta)).timestamp())
    return max(0.0, time.time() - due)


def _mark_process_dead(**_: t.Any) -> None:
    """A pool process ends: let the multiprocess collector drop its live data."""
    multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
