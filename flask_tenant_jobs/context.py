"""The current tenant: the one place that sets and resets it.

The tenant lives in a :class:`contextvars.ContextVar`, so each thread, gevent
greenlet and asyncio task sees its own value. Everything else in the package
reads it through :func:`get_tenant` and :func:`is_unscoped`; only the helpers
here change it, always with a token so the previous value comes back.

Every change also sets a fresh marker (restored with the tenant), so that code
undoing a change late (a generator closed by the garbage collector) can tell
whether its change is still the current one: :func:`is_current`.
"""

from __future__ import annotations

import typing as t
from contextlib import contextmanager, suppress
from contextvars import ContextVar, Token

_tenant: ContextVar[str | None] = ContextVar("flask_tenant_jobs.tenant", default=None)
_unscoped: ContextVar[bool] = ContextVar("flask_tenant_jobs.unscoped", default=False)
_marker: ContextVar[object] = ContextVar("flask_tenant_jobs.marker", default=None)


class Entered(t.NamedTuple):
    """What :func:`enter` or :func:`start` changed, for :func:`leave` to undo."""

    tenant: Token[str | None]
    marker: Token[object]
    mark: object
    unscoped: Token[bool] | None = None


def get_tenant() -> str | None:
    """Return the current tenant name, or ``None``."""
    return _tenant.get()


def is_unscoped() -> bool:
    """Return whether deliberate cross-tenant work (``without_tenant``) is under way."""
    return _unscoped.get()


def enter(name: str | None) -> Entered:
    """Make ``name`` current and return what :func:`leave` needs to restore the previous."""
    mark = object()
    return Entered(_tenant.set(name), _marker.set(mark), mark)


def start(name: str | None) -> Entered:
    """A request or task starts: ``name`` current and scoping on, whatever the caller had."""
    mark = object()
    return Entered(_tenant.set(name), _marker.set(mark), mark, _unscoped.set(False))


def leave(entered: Entered) -> None:
    """Restore the tenant (and, after :func:`start`, the unscoped flag) of before."""
    if entered.unscoped is not None:
        _unscoped.reset(entered.unscoped)
    _marker.reset(entered.marker)
    _tenant.reset(entered.tenant)


def is_current(entered: Entered) -> bool:
    """Whether the tenant ``entered`` set is still current here, with nothing set since
    that was not undone (so that undoing it now changes no one else's tenant)."""
    return _marker.get() is entered.mark


def leave_if_current(entered: Entered) -> bool:
    """Undo ``entered`` only if it is still current in this context; return whether it was.

    For undoing late (a generator closed by the garbage collector, or in another
    thread or task): it must never change the tenant of the code running then.
    """
    if not is_current(entered):
        return False
    try:
        leave(entered)
    except ValueError:  # the tokens belong to another context (a copy of ours)
        return False
    return True


def clear() -> None:
    """Set no tenant in this context (the outer block's token still restores its own)."""
    _tenant.set(None)
    _marker.set(object())


@contextmanager
def active(name: str | None) -> t.Iterator[None]:
    """Run the block with ``name`` current, then restore the previous tenant."""
    entered = enter(name)
    try:
        yield
    finally:
        leave(entered)


@contextmanager
def unscoped() -> t.Iterator[None]:
    """Run the block with tenant filtering turned off.

    Closed late (a block left open, collected later, maybe in another context), it may
    end unscoped mode but never turn it back on.
    """
    token = _unscoped.set(True)
    try:
        yield
    except GeneratorExit:
        if token.old_value is not True:
            with suppress(ValueError):  # the token belongs to another context
                _unscoped.reset(token)
        raise
    except BaseException:
        _unscoped.reset(token)
        raise
    else:
        _unscoped.reset(token)


@contextmanager
def isolated() -> t.Iterator[None]:
    """Run the block, then restore the tenant and the unscoped flag, whatever it left set."""
    tenant_token = _tenant.set(_tenant.get())
    unscoped_token = _unscoped.set(_unscoped.get())
    marker_token = _marker.set(_marker.get())
    try:
        yield
    finally:
        _marker.reset(marker_token)
        _unscoped.reset(unscoped_token)
        _tenant.reset(tenant_token)
