"""The task run in progress in this thread or greenlet, between ``task_prerun`` and
``task_postrun``: what the worker restored for it and what ``TenantTask.__call__`` checks.

The worker (:mod:`flask_tenant_jobs.worker`) begins a run when Celery's tracer starts a
task and ends it when the tracer is done; ``TenantTask.__call__`` reads it to refuse a
body whose tenant could not be restored, and to know the tracer's own call. A context
variable, not attributes of the task's request: reading ``task.request`` walks Celery's
request stack, which costs more than everything else the worker does per task.
Runs nest (a task run in place with ``apply()`` inside another's body); each ends with
its token, giving back the one it interrupted.
"""

from __future__ import annotations

import typing as t
from contextvars import ContextVar, Token

if t.TYPE_CHECKING:
    from flask.ctx import AppContext

    from .context import Entered


class Run:
    """One run of a task by Celery's tracer (a worker, ``apply()`` or eager mode)."""

    __slots__ = ("app_context", "call_pending", "entered", "error", "task", "task_id", "token")

    token: Token[Run | None]

    def __init__(
        self,
        task: object,
        task_id: object,
        app_context: AppContext | None = None,
        entered: Entered | None = None,
        error: Exception | None = None,
        call_pending: bool = False,
    ) -> None:
        self.task = task
        self.task_id = task_id
        #: the app context pushed and the tenant entered for it (``None``: none pushed)
        self.app_context = app_context
        self.entered = entered
        #: why its tenant could not be restored: raised instead of running the body
        self.error = error
        #: whether the tracer's own call of the task (``TenantTask.__call__``) is to come
        self.call_pending = call_pending


_current: ContextVar[Run | None] = ContextVar("flask_tenant_jobs.run", default=None)


def begin(run: Run) -> None:
    """Make ``run`` the run in progress here, until :func:`end`."""
    run.token = _current.set(run)


def current() -> Run | None:
    """The run in progress here, or ``None``."""
    return _current.get()


def end(run: Run) -> None:
    """``run`` is over: the run it interrupted (if any) is in progress again."""
    _current.reset(run.token)
