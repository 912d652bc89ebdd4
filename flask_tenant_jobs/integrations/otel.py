"""OpenTelemetry: the tenant as an attribute of request and task spans.

Installed when ``opentelemetry-api`` is importable and ``TENANT_JOBS_OTEL_ATTRIBUTE``
(default ``"tenant"``) names the attribute. Only recording spans are touched,
and only when a tenant is current: spans of requests and tasks with no tenant
get no attribute.

* Requests: the span current when Flask finishes the request (or meets an
  unhandled error), i.e. the request span of opentelemetry-instrumentation-flask
  or of a WSGI middleware, gets the request's tenant.
* Tasks, with opentelemetry-instrumentation-celery: the ``apply_async`` span of
  each published tenant task gets the tenant its message carries (also for chain
  steps, callbacks, retries and ``apply_for_each_tenant``), and the ``run`` span
  in the worker gets the tenant the task ran in. Both are found by task id in
  the instrumentation's own bookkeeping, so the attribute lands on the right span
  whichever of the two libraries connected its Celery receivers first.
"""

from __future__ import annotations

import typing as t
from weakref import WeakKeyDictionary

from celery import Celery, Task
from celery.signals import after_task_publish, before_task_publish, task_postrun, task_prerun
from flask import Flask, got_request_exception, request_finished
from opentelemetry import trace

from .. import context
from ..sending import header_name
from ..tasks import TenantTask

try:
    from opentelemetry.instrumentation.celery import utils as celery_spans
except ImportError:  # only requests are traced then
    celery_spans = None  # type: ignore[assignment]

#: Request attribute: the tenant a task ran in, kept from ``task_prerun`` for ``task_postrun``.
_RAN_IN = "_tenant_jobs_otel_tenant"
_request_attributes: WeakKeyDictionary[Flask, str] = WeakKeyDictionary()
_task_attributes: WeakKeyDictionary[Celery, str] = WeakKeyDictionary()


def install(app: Flask, attribute: str) -> None:
    """Tag ``app``'s request spans and, with the Celery instrumentation, its task spans."""
    _request_attributes[app] = attribute
    request_finished.connect(tag_request_span, app)
    got_request_exception.connect(tag_request_span, app)
    celery_app = app.extensions.get("celery")
    if celery_app is not None and celery_spans is not None:
        _task_attributes[celery_app] = attribute
        before_task_publish.connect(_tag_publish_span)
        after_task_publish.connect(_tag_publish_span)
        task_prerun.connect(_tag_run_span_at_start)
        task_postrun.connect(_tag_run_span_at_end)


def tag_request_span(sender: Flask, **_: t.Any) -> None:
    """Put the current tenant on the request's span, if it is recording."""
    tenant = context.get_tenant()
    if tenant is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(_request_attributes[sender], tenant)


def _tag_publish_span(**message: t.Any) -> None:
    """Put the tenant a message carries on its ``apply_async`` span.

    Connected to both ``before_task_publish`` and ``after_task_publish``: the span
    exists from the instrumentation's first receiver to its second, so one of ours
    finds it, whichever order the receivers run in.
    """
    task = celery_spans.retrieve_task_from_sender(message)
    attribute = _attribute_for(task)
    headers = message.get("headers")
    if attribute is None or not headers or not isinstance(task, TenantTask):
        return  # a plain task carries no tenant, whatever its headers say
    tenant = headers.get(header_name(task.app))
    task_id = celery_spans.retrieve_task_id_from_message(message)
    if tenant is None or task_id is None:
        return
    found = celery_spans.retrieve_context(task, task_id, is_publish=True)
    if found is not None and found[0].is_recording():
        found[0].set_attribute(attribute, tenant)


def _tag_run_span_at_start(task: Task | None = None, task_id: str = "", **_: t.Any) -> None:
    """Note the tenant the task runs in; tag its ``run`` span if it was started already."""
    attribute = _attribute_for(task)
    tenant = context.get_tenant()
    if attribute is None or tenant is None:
        return
    setattr(task.request, _RAN_IN, tenant)  # type: ignore[union-attr]
    _tag_run_span(task, task_id, attribute, tenant)


def _tag_run_span_at_end(task: Task | None = None, task_id: str = "", **_: t.Any) -> None:
    """Tag the ``run`` span with the tenant noted at the start, if it was started later."""
    attribute = _attribute_for(task)
    tenant = getattr(getattr(task, "request", None), _RAN_IN, None)
    if attribute is not None and tenant is not None:
        _tag_run_span(task, task_id, attribute, tenant)


def _tag_run_span(task: Task | None, task_id: str, attribute: str, tenant: str) -> None:
    found = celery_spans.retrieve_context(task, task_id)
    if found is not None and found[0].is_recording():
        found[0].set_attribute(attribute, tenant)


def _attribute_for(task: Task | None) -> str | None:
    """The attribute name for tasks of ``task``'s Celery app (``None``: not ours)."""
    celery_app = getattr(task, "app", None)
    return None if celery_app is None else _task_attributes.get(celery_app)
