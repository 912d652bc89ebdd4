"""Sentry: the tag ``tenant`` on every event captured while a tenant is current.

Installed when ``sentry-sdk`` is importable. The tag is added by a global event
processor, at the moment an event is captured (in the thread that captures it),
from the tenant current then: errors raised in a request, in a task, a chain
step, a callback or an errback, and messages captured by hand. Nothing runs on
requests or tasks that report nothing, and no scope is changed, so the tag can
never outlive its request or task.
"""

from __future__ import annotations

import typing as t

from sentry_sdk.scope import add_global_event_processor, global_event_processors

from .. import context

#: The tag's name.
TAG = "tenant"


def tag_event(event: dict[str, t.Any], hint: dict[str, t.Any]) -> dict[str, t.Any]:
    """Tag ``event`` with the current tenant, if there is one."""
    tenant = context.get_tenant()
    if tenant is not None:
        tags = event.get("tags")
        if not isinstance(tags, dict):
            tags = event["tags"] = {}
        tags[TAG] = tenant
    return event


def install() -> None:
    """Add :func:`tag_event` to Sentry's global event processors (once per process)."""
    if tag_event not in global_event_processors:
        add_global_event_processor(tag_event)  # type: ignore[arg-type]
