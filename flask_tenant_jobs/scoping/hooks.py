"""Listening to SQLAlchemy events once per object, whatever objects lived at its address before.

``event.contains()`` cannot answer "does this engine listen already": SQLAlchemy
keys its registry by ``id(target)``, and an engine's listeners live on its
dialect, which can outlive the engine. A new engine at a freed one's address
then looks hooked and is left without the tenant checks.
"""

from __future__ import annotations

import typing as t
from weakref import WeakKeyDictionary

from sqlalchemy import event

#: Per target object, the (event name, listener) pairs it was given here.
_listened: WeakKeyDictionary[t.Any, set[tuple[str, t.Any]]] = WeakKeyDictionary()


def listen_once(target: t.Any, name: str, listener: t.Any, **options: t.Any) -> None:
    """``event.listen(target, name, listener, **options)``, unless done for this very object."""
    done = _listened.setdefault(target, set())
    if (name, listener) not in done:
        event.listen(target, name, listener, **options)
        done.add((name, listener))
