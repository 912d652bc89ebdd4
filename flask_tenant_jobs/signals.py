"""Blinker signals sent by flask-tenant-jobs.

Connect receivers as with Flask's own signals, e.g.
``tenant_resolved.connect(receiver, app)``. The sender is the Flask app.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: A request was resolved to a tenant. Keyword: ``tenant``.
tenant_resolved = _signals.signal("tenant-resolved")
#: A request or a task named a tenant that does not exist or is malformed.
#: Keywords: ``tenant`` (the raw value) and ``source`` (``"request"`` or ``"task"``).
tenant_not_found = _signals.signal("tenant-not-found")
#: ``switch()`` entered a tenant. Keywords: ``tenant`` and ``previous``.
tenant_switched = _signals.signal("tenant-switched")
#: ``create()`` made a tenant. Keyword: ``tenant``.
tenant_created = _signals.signal("tenant-created")
#: ``drop()`` removed a tenant. Keyword: ``tenant``.
tenant_dropped = _signals.signal("tenant-dropped")
#: A tenant task was published. Keywords: ``task`` (name) and ``tenant``.
task_enqueued = _signals.signal("task-enqueued")
#: A worker restored a task's tenant before running it. Keywords: ``task`` and ``tenant``.
task_tenant_restored = _signals.signal("task-tenant-restored")
#: A per-tenant limit held a task back (the worker picked another tenant's task, or
#: waits). Sent in the worker process that tried to pick it. Keywords: ``task`` (name)
#: and ``tenant``.
task_held_back = _signals.signal("task-held-back")
