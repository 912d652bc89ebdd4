"""A user's tests, run by tests/test_pytest_plugin.py through pytester."""

from __future__ import annotations

import typing as t

import pytest
from celery import chain
from conftest import Order, db, process_order

from flask_tenant_jobs import NoTenantError, TenantJobs, current_tenant

OPEN_SWITCHES: list[t.Any] = []


@pytest.mark.tenant("acme")
def test_unit_run_the_job_now() -> None:
    order = Order()
    db.session.add(order)
    db.session.commit()
    assert process_order.apply(args=(order.id,)).get() == "acme"
    db.session.expire_all()
    assert db.session.get(Order, order.id).status == "processed"


@pytest.mark.tenant("acme")
def test_signature_carries_the_tenant() -> None:
    assert process_order.s(1).options["headers"]["tenant_for_job"] == "acme"


def test_integration_two_tenants(tenant_jobs: TenantJobs, enqueued_tasks: t.Any) -> None:
    ids = {}
    for name in ["acme", "globex"]:
        with tenant_jobs.switch(name):
            order = Order()
            db.session.add(order)
            db.session.commit()
            ids[name] = order.id
            process_order.delay(order.id)
    assert [(r.name.rsplit(".", 1)[-1], r.tenant) for r in enqueued_tasks] == [
        ("process_order", "acme"),
        ("process_order", "globex"),
    ]
    assert enqueued_tasks.perform() == ["acme", "globex"]
    for name in ["acme", "globex"]:
        with tenant_jobs.switch(name):
            db.session.expire_all()
            assert db.session.get(Order, ids[name]).status == "processed"


def test_perform_follows_a_chain(tenant_jobs: TenantJobs, enqueued_tasks: t.Any) -> None:
    with tenant_jobs.switch("globex"):
        order = Order()
        db.session.add(order)
        db.session.commit()
        chain(process_order.si(order.id), process_order.si(order.id)).delay()
    assert len(enqueued_tasks) == 1
    assert enqueued_tasks.perform() == ["globex", "globex"]
    assert len(enqueued_tasks) == 2


def test_perform_runs_map_in_its_tenant(tenant_jobs: TenantJobs, enqueued_tasks: t.Any) -> None:
    with tenant_jobs.switch("acme"):
        orders = [Order(), Order()]
        db.session.add_all(orders)
        db.session.commit()
        process_order.map([order.id for order in orders]).delay()
    with pytest.raises(NoTenantError):
        process_order.map([1]).delay()  # no tenant: refused where it is sent
    assert [(r.name, r.tenant) for r in enqueued_tasks] == [("celery.map", "acme")]
    assert enqueued_tasks.perform() == [["acme", "acme"]]


def test_leaves_a_switch_open(tenant_jobs: TenantJobs) -> None:
    OPEN_SWITCHES.append(tenant_jobs.switch("acme"))
    OPEN_SWITCHES[-1].__enter__()
    assert current_tenant() == "acme"


def test_the_next_test_starts_with_no_tenant() -> None:
    assert current_tenant() is None


def test_tenant_client(tenant_client: t.Any) -> None:
    assert tenant_client("globex").get("/whoami").json == {"tenant": "globex"}
