"""The current tenant: the one place that sets and resets it.

The tenant lives in a :class:`contextvars.ContextVar`, so each thread, gevent
greenlet and asyncio task sees its own value. Everything else in the package
reads it through :func:`get_tenant` and :func:`is_unscoped`; only the helpers
here change it, always with a token so the previous value comes back.

Each change sets a new :class:`Entered` as the variable's value, so that code
undoing a change late (a generator closed by the garbage collector) can tell
whether its change is still the current one: :func:`is_current`.
"""

from __future__ import annotations

import typing as t
from contextlib import contextmanager, suppress
from contextvars import ContextVar, Token


class Entered:
    """One change of the current tenant: the variable's value while it is current, and
    the tokens that undo it (:func:`leave`).

    One object per change, not a name and a separate marker, so that a request or a
    task sets one context variable, not three.
    """

    __slots__ = ("name", "started", "token", "unscoped")

    token: Token[Entered]
    #: what :func:`start` turned off (``None``: scoping was on already, nothing set)
    unscoped: Token[bool] | None

    def __init__(self, name: str | None, started: bool = False) -> None:
        self.name = name
        self.started = started
        self.unscoped = None


#: The value before any change (no tenant); never changed itself.
_NO_CHANGE: t.Final = Entered(None)
_current: ContextVar[Entered] = ContextVar("flask_tenant_jobs.tenant", default=_NO_CHANGE)
_unscoped: ContextVar[bool] = ContextVar("flask_tenant_jobs.unscoped", default=False)


def get_tenant() -> str | None:
    """Return the current tenant name, or ``None``."""
    return _current.get().name


def is_unscoped() -> bool:
    """Return whether deliberate cross-tenant work (``without_tenant``) is under way."""
    return _unscoped.get()


def enter(name: str | None) -> Entered:
    """Make ``name`` current and return what :func:`leave` needs to restore the previous."""
    entered = Entered(name)
    entered.token = _current.set(entered)
    return entered


def start(name: str | None) -> Entered:
    """A request or task starts: ``name`` current and scoping on, whatever the caller had."""
    entered = Entered(name, started=True)
    if _unscoped.get():
        entered.unscoped = _unscoped.set(False)
    entered.token = _current.set(entered)
    return entered


def leave(entered: Entered) -> None:
    """Restore the tenant (and, after :func:`start`, the unscoped flag) of before.

    After :func:`start` with scoping on, scoping is on again afterwards, also if a
    ``without_tenant()`` block was left open in between.
    """
    if entered.started:
        if entered.unscoped is not None:
            _unscoped.reset(entered.unscoped)
        elif _unscoped.get():
            _unscoped.set(False)
    _current.reset(entered.token)


def is_current(entered: Entered) -> bool:
    """Whether the tenant ``entered`` set is still current here, with nothing set since
    that was not undone (so that undoing it now changes no one else's tenant)."""
    return _current.get() is entered


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
    _current.set(Entered(None))


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
    tenant_token = _current.set(_current.get())
    unscoped_token = _unscoped.set(_unscoped.get())
    try:
        yield
    finally:
        _unscoped.reset(unscoped_token)
        _current.reset(tenant_token)
