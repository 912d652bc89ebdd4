"""``TenantJobs.each()``: an iterator that switches into each tenant in turn.

Python runs no code on ``break``. A direct ``for`` loop drops its iterator at
once, which closes it and restores the previous tenant there and then (on
CPython). An iterator bound to a variable keeps the loop's tenant current until
it is closed or collected, so closing it is guarded: it restores the previous
tenant only while the tenant it entered is still the current one, and never
changes a tenant that other code set since (it warns instead).
"""

from __future__ import annotations

import typing as t
import warnings

from . import context

#: What to write instead, in the warning of an iterator collected too late.
SAFE_FORMS = (
    "use a direct 'for name in tenant_jobs.each():' loop, 'with tenant_jobs.each() as "
    "tenants:', contextlib.closing(tenant_jobs.each()), or "
    "tenant_jobs.call_for_each_tenant(func)"
)


class TenantIterator:
    """Iterates over tenant names, each one current while the loop body runs.

    Use it in a direct ``for`` loop, or close it: ``with tenant_jobs.each() as
    tenants:`` (or :func:`contextlib.closing`) restores the previous tenant
    when the block ends, also after ``break``.
    """

    def __init__(self, names: t.Iterable[str], enter: t.Callable[[str], context.Entered]) -> None:
        self._names = iter(names)
        self._enter = enter
        self._entered: context.Entered | None = None
        self._current_name: str | None = None
        self._finished = False

    def __iter__(self) -> TenantIterator:
        return self

    def __next__(self) -> str:
        """Leave the previous tenant of the loop and switch into the next one."""
        self._leave()
        if not self._finished:
            for name in self._names:
                self._entered = self._enter(name)
                self._current_name = name
                return name
            self._finished = True
        raise StopIteration

    def close(self) -> None:
        """Stop iterating; restore the previous tenant if the loop's is still current."""
        self._leave()
        self._finished = True

    def __enter__(self) -> TenantIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        """Collected before it was closed: restore if safe, else warn and change nothing."""
        if self._entered is None:
            return
        name = self._current_name
        if not self._leave():
            warnings.warn(
                f"A tenant_jobs.each() iterator was collected unclosed while other code had "
                f"switched tenants: it left tenant {name!r} current after its loop ended, and "
                f"restored nothing now so as not to change the tenant of the code running. "
                f"Do not bind each() to a variable and break out of the loop; {SAFE_FORMS}.",
                ResourceWarning,
                stacklevel=2,
            )

    def _leave(self) -> bool:
        """Undo the current step's switch if it is still current; return whether it was."""
        entered, self._entered = self._entered, None
        return entered is not None and context.leave_if_current(entered)
