"""The current tenant: the one place that sets and resets it.

The tenant lives in a :class:`contextvars.ContextVar`, so each thread, gevent
greenlet and asyncio task sees its own value. Everything else in the package
reads it through :func:`get_tenant` and :func:`is_unscoped`; only the helpers
here change it, always with a token so the previous value comes back.
"""

from __future__ import annotations

import typing as t
from contextlib import contextmanager
from contextvars import ContextVar, Token

_tenant: ContextVar[str | None] = ContextVar("flask_tenant_jobs.tenant", default=None)
_unscoped: ContextVar[bool] = ContextVar("flask_tenant_jobs.unscoped", default=False)



def get_tenant() -> str | None:
    """Return the current tenant name, or ``None``."""
    return _tenant.get()


def is_unscoped() -> bool:
    """Return whether deliberate cross-tenant work (``without_tenant``) is under way."""
    return _unscoped.get()


def enter(name: str | None) -> Token[str | None]:
    """Make ``name`` current and return the token that :func:`leave` needs."""
    return _tenant.set(name)


def leave(token: Token[str | None]) -> None:
    """Restore the tenant that was current before :func:`enter` returned ``token``."""
    _tenant.reset(token)


def clear() -> None:
    """Set no tenant in this context (the outer block's token still restores its own)."""
    _tenant.set(None)


@contextmanager
def active(name: str | None) -> t.Iterator[None]:
    """Run the block with ``name`` current, then restore the previous tenant."""
    token = _tenant.set(name)
    try:
        yield
    finally:
        _tenant.reset(token)


@contextmanager
def unscoped() -> t.Iterator[None]:
    """Run the block with tenant filtering turned off."""
    token = _unscoped.set(True)
    try:
        yield
    finally:
        _unscoped.reset(token)


@contextmanager
def isolated() -> t.Iterator[None]:
    """Run the block, then restore the tenant and the unscoped flag, whatever it left set."""
    tenant_token = _tenant.set(_tenant.get())
    unscoped_token = _unscoped.set(_unscoped.get())
    try:
        yield
    finally:
        _unscoped.reset(unscoped_token)
        _tenant.reset(tenant_token)
