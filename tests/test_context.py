"""The current tenant: switch, current, reset, each, without_tenant, and its isolation
per thread, gevent greenlet and asyncio task."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import threading
import typing as t
import warnings
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import (
    InvalidTenantNameError,
    TenantJobs,
    TenantNotFoundError,
    current_tenant,
)
from flask_tenant_jobs.context import is_unscoped
from flask_tenant_jobs.signals import tenant_switched

from .core_app import make_app
from .data import MALFORMED_NAMES

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture
def app_and_ext() -> t.Iterator[tuple[Flask, TenantJobs]]:
    app, tenant_jobs = make_app(SQLAlchemy(), "sqlite://")
    with app.app_context():
        yield app, tenant_jobs


@pytest.fixture
def tenant_jobs(app_and_ext: tuple[Flask, TenantJobs]) -> TenantJobs:
    return app_and_ext[1]


def test_no_tenant_by_default(tenant_jobs: TenantJobs) -> None:
    assert tenant_jobs.current is None
    assert current_tenant() is None


def test_switch_sets_the_tenant_and_restores_none(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme") as name:
        assert name == "acme"
        assert tenant_jobs.current == "acme"
        assert current_tenant() == "acme"
    assert current_tenant() is None


def test_nested_switches_restore_the_outer_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        with tenant_jobs.switch("globex"):
            assert current_tenant() == "globex"
            with tenant_jobs.switch(None):
                assert current_tenant() is None
            assert current_tenant() == "globex"
        assert current_tenant() == "acme"
    assert current_tenant() is None


def test_switch_restores_the_outer_tenant_when_the_block_raises(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        with pytest.raises(ZeroDivisionError), tenant_jobs.switch("globex"):
            1 / 0  # noqa: B018
        assert current_tenant() == "acme"
    assert current_tenant() is None


def test_switch_to_an_unknown_tenant_raises_and_changes_nothing(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        with pytest.raises(TenantNotFoundError) as raised, tenant_jobs.switch("umbrella"):
            pytest.fail("the block must not run for an unknown tenant")
        assert raised.value.tenant == "umbrella"
        assert current_tenant() == "acme"


@pytest.mark.parametrize("name", MALFORMED_NAMES, ids=repr)
def test_switch_to_a_malformed_name_raises_and_changes_nothing(
    tenant_jobs: TenantJobs, name: object
) -> None:
    with tenant_jobs.switch("acme"):
        with pytest.raises(InvalidTenantNameError), tenant_jobs.switch(name):  # type: ignore[arg-type]
            pytest.fail("the block must not run for a malformed name")
        assert current_tenant() == "acme"
    assert not tenant_jobs.exists(name)


def test_reset_clears_the_tenant_and_the_outer_switch_still_restores(
    tenant_jobs: TenantJobs,
) -> None:
    with tenant_jobs.switch("acme"):
        with tenant_jobs.switch("globex"):
            tenant_jobs.reset()
            assert current_tenant() is None
        assert current_tenant() == "acme"
    assert current_tenant() is None


def test_tenant_names_are_sorted(tenant_jobs: TenantJobs) -> None:
    assert tenant_jobs.tenant_names() == ["acme", "globex", "initech"]


def test_exists(tenant_jobs: TenantJobs) -> None:
    assert tenant_jobs.exists("acme")
    assert not tenant_jobs.exists("umbrella")


def test_each_switches_into_every_tenant_in_turn(tenant_jobs: TenantJobs) -> None:
    seen = [(name, current_tenant()) for name in tenant_jobs.each()]
    assert seen == [("acme", "acme"), ("globex", "globex"), ("initech", "initech")]
    assert current_tenant() is None


def test_each_restores_the_outer_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        assert list(tenant_jobs.each()) == ["acme", "globex", "initech"]
        assert current_tenant() == "globex"


def test_each_leaves_no_tenant_behind_when_the_body_breaks(tenant_jobs: TenantJobs) -> None:
    for name in tenant_jobs.each():
        if name == "globex":
            break
    assert current_tenant() is None


def test_each_leaves_no_tenant_behind_when_the_body_raises(tenant_jobs: TenantJobs) -> None:
    visited: list[str] = []
    with pytest.raises(RuntimeError, match="stop in acme"):
        for name in tenant_jobs.each():
            visited.append(name)
            raise RuntimeError(f"stop in {current_tenant()}")
    assert visited == ["acme"]
    assert current_tenant() is None


def test_each_restores_the_outer_tenant_when_the_body_raises(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("initech"):
        with pytest.raises(RuntimeError):
            for _ in tenant_jobs.each():
                raise RuntimeError
        assert current_tenant() == "initech"


def test_each_bound_to_a_variable_and_closed_late_changes_no_ones_tenant(
    tenant_jobs: TenantJobs,
) -> None:
    """Regression: a broken-out-of ``each()`` collected inside another tenant's switch
    restored its stale tenant there (globex showed up inside ``switch("initech")``)."""
    with tenant_jobs.switch("globex"):
        tenants = tenant_jobs.each()
        for _ in tenants:
            break
        assert current_tenant() == "acme"  # no code runs on break: documented
    with tenant_jobs.switch("initech"):
        with pytest.warns(ResourceWarning, match="collected unclosed"):
            del tenants
            gc.collect()
        assert current_tenant() == "initech"
    assert current_tenant() is None


def test_each_closed_late_with_close_changes_no_ones_tenant(tenant_jobs: TenantJobs) -> None:
    tenants = tenant_jobs.each()
    assert next(tenants) == "acme"
    with tenant_jobs.switch("initech"):
        tenants.close()
        assert current_tenant() == "initech"
        with tenant_jobs.switch("acme"):  # the same tenant as the iterator's: still not its
            tenants.close()
            assert current_tenant() == "acme"
        assert current_tenant() == "initech"
    assert list(tenants) == []


def test_each_closed_while_its_tenant_is_current_restores_the_previous(
    tenant_jobs: TenantJobs,
) -> None:
    with tenant_jobs.switch("globex"):
        tenants = tenant_jobs.each()
        for name in tenants:
            with tenant_jobs.switch("initech"):  # balanced switches in the body are fine
                pass
            if name == "globex":
                break
        assert current_tenant() == "globex"
        tenants.close()
        assert current_tenant() == "globex"  # the tenant of before the loop
    assert current_tenant() is None


def test_each_in_a_with_block_restores_the_previous_tenant_after_break(
    tenant_jobs: TenantJobs,
) -> None:
    with tenant_jobs.switch("initech"), tenant_jobs.each() as tenants:
        for name in tenants:
            if name == "acme":
                break
    assert current_tenant() is None
    with tenant_jobs.switch("initech"):
        with closing(tenant_jobs.each()) as tenants:
            for _ in tenants:
                break
        assert current_tenant() == "initech"


def test_each_collected_in_another_thread_changes_nothing(tenant_jobs: TenantJobs) -> None:
    tenants = tenant_jobs.each()
    next(tenants)
    holder = [tenants]
    del tenants
    seen: list[str | None] = []

    def collect_here() -> None:
        with tenant_jobs.switch("globex"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                holder.clear()
                gc.collect()
            seen.append(current_tenant())

    thread = threading.Thread(target=collect_here)
    thread.start()
    thread.join(timeout=10)
    assert seen == ["globex"]
    assert current_tenant() == "acme"  # left behind by next(): this thread's own to end


def test_call_for_each_tenant_cannot_leave_a_tenant_behind(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("initech"):
        results = tenant_jobs.call_for_each_tenant(lambda name: (name, current_tenant()))
        assert current_tenant() == "initech"
    assert results == {name: (name, name) for name in ("acme", "globex", "initech")}

    def fail_in_globex(name: str) -> None:
        if name == "globex":
            raise RuntimeError(current_tenant())

    with pytest.raises(RuntimeError, match="globex"):
        tenant_jobs.call_for_each_tenant(fail_in_globex)
    assert current_tenant() is None


def test_a_switch_closed_late_changes_no_ones_tenant(tenant_jobs: TenantJobs) -> None:
    """A ``switch()`` left open in an ExitStack and collected inside another switch."""
    stack = ExitStack()
    stack.enter_context(tenant_jobs.switch("acme"))
    with tenant_jobs.switch("globex"):
        stack.pop_all()  # the switch's generator is dropped, unclosed
        del stack
        gc.collect()
        assert current_tenant() == "globex"


def test_a_without_tenant_block_closed_late_never_turns_scoping_off(
    tenant_jobs: TenantJobs,
) -> None:
    with tenant_jobs.without_tenant():
        stack = ExitStack()
        stack.enter_context(tenant_jobs.without_tenant())
    assert not is_unscoped()  # the outer block ended scoped-off mode for this context
    stack.pop_all()
    del stack
    gc.collect()  # the inner block's late close must not turn it back on
    assert not is_unscoped()


def test_without_tenant_keeps_the_tenant_and_turns_scoping_off(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        assert not is_unscoped()
        with tenant_jobs.without_tenant():
            assert is_unscoped()
            assert current_tenant() == "acme"
        assert not is_unscoped()


def test_without_tenant_ends_when_the_block_raises(tenant_jobs: TenantJobs) -> None:
    with pytest.raises(KeyError), tenant_jobs.without_tenant():
        raise KeyError
    assert not is_unscoped()


def test_switch_sends_tenant_switched(app_and_ext: tuple[Flask, TenantJobs]) -> None:
    app, tenant_jobs = app_and_ext
    sent: list[tuple[object, dict[str, t.Any]]] = []

    def receiver(sender: object, **kwargs: t.Any) -> None:
        sent.append((sender, kwargs))

    with tenant_switched.connected_to(receiver, app):
        with tenant_jobs.switch("acme"), tenant_jobs.switch("globex"):
            pass
        with pytest.raises(TenantNotFoundError), tenant_jobs.switch("umbrella"):
            pass
    assert sent == [
        (app, {"tenant": "acme", "previous": None}),
        (app, {"tenant": "globex", "previous": "acme"}),
    ]


def test_threads_have_independent_tenants(app_and_ext: tuple[Flask, TenantJobs]) -> None:
    app, tenant_jobs = app_and_ext
    barrier = threading.Barrier(3)
    seen: dict[str, list[str | None]] = {}

    def work(name: str) -> None:
        with app.app_context():
            observed = [current_tenant()]  # a new thread starts with no tenant
            with tenant_jobs.switch(name):
                barrier.wait(timeout=10)  # every thread is inside its switch now
                observed.append(current_tenant())
                barrier.wait(timeout=10)
                observed.append(current_tenant())
            observed.append(current_tenant())
            seen[name] = observed

    with tenant_jobs.switch("initech"):
        threads = [threading.Thread(target=work, args=(n,)) for n in ("acme", "globex", "initech")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert current_tenant() == "initech"
    assert seen == {name: [None, name, name, None] for name in ("acme", "globex", "initech")}


def test_asyncio_tasks_have_independent_tenants(tenant_jobs: TenantJobs) -> None:

    async def work(name: str) -> list[str | None]:
        observed = [current_tenant()]  # a task starts with a copy of its creator's context
        with tenant_jobs.switch(name):
            await asyncio.sleep(0)  # let the other tasks switch in between
            observed.append(current_tenant())
            await asyncio.sleep(0)
            observed.append(current_tenant())
        observed.append(current_tenant())
        return observed

    async def main() -> list[list[str | None]]:
        with tenant_jobs.switch("initech"):
            results = list(await asyncio.gather(work("acme"), work("globex")))
            assert current_tenant() == "initech"
        return results

    assert asyncio.run(main()) == [
        ["initech", "acme", "acme", "initech"],
        ["initech", "globex", "globex", "initech"],
    ]
    assert current_tenant() is None


GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import gevent
    from flask_sqlalchemy import SQLAlchemy

    from flask_tenant_jobs import current_tenant
    from tests.core_app import make_app

    app, tenant_jobs = make_app(SQLAlchemy(), "sqlite://")

    def work(name):
        with app.app_context():
            observed = [current_tenant()]
            with tenant_jobs.switch(name):
                gevent.sleep(0.01)  # the other greenlets switch in the meantime
                observed.append(current_tenant())
                gevent.sleep(0.01)
                observed.append(current_tenant())
            observed.append(current_tenant())
            return observed

    with app.app_context(), tenant_jobs.switch("initech"):
        greenlets = [gevent.spawn(work, name) for name in ("acme", "globex", "initech")]
        gevent.joinall(greenlets, timeout=10, raise_error=True)
        assert current_tenant() == "initech", current_tenant()
    print([g.value for g in greenlets])
    """
)


def test_gevent_greenlets_have_independent_tenants() -> None:
    done = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = [[None, name, name, None] for name in ("acme", "globex", "initech")]
    assert done.stdout.strip() == repr(expected)
