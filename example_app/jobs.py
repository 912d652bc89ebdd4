"""The example's background jobs: tenant tasks, a scheduled one and cross-tenant ones."""

from __future__ import annotations

import typing as t

from celery import shared_task

from flask_tenant_jobs import current_tenant, tenant_task

from . import db, tenant_jobs
from .models import Order


@tenant_task
def process_order(order_id: int) -> dict[str, t.Any]:
    """Mark one order processed; sent by ``POST /orders`` in the request's tenant."""
    order = db.session.get(Order, order_id)
    if order is None:  # another tenant's id, or deleted: nothing of ours to do
        return {"tenant": current_tenant(), "order": order_id, "status": "missing"}
    order.status = "processed"
    db.session.commit()
    return {"tenant": current_tenant(), "order": order_id, "status": order.status}


@tenant_task
def order_report(kind: str = "summary", statuses: list[str] | None = None) -> dict[str, t.Any]:
    """Count the tenant's orders by status (a job with arguments)."""
    counts: dict[str, int] = {}
    for order in db.session.scalars(db.select(Order)):
        if statuses is None or order.status in statuses:
            counts[order.status] = counts.get(order.status, 0) + 1
    return {"tenant": current_tenant(), "kind": kind, "counts": counts}


@tenant_task
def send_digest() -> str:
    """The tenant's daily digest; sent with ``countdown``/``eta`` or by beat for every tenant."""
    total = len(db.session.scalars(db.select(Order.id)).all())
    return f"{current_tenant()}: {total} orders in the shop"


@shared_task
def count_orders_everywhere() -> dict[str, int]:
    """Cross-tenant maintenance: visit every tenant with ``each()``."""
    return {
        tenant: len(db.session.scalars(db.select(Order.id)).all())
        for tenant in tenant_jobs.each()
    }


@shared_task
def start_nightly_reports() -> list[str]:
    """A cross-tenant job that sends one ``order_report`` per tenant, each in its tenant."""
    return [result.id for result in order_report.delay_for_each_tenant("nightly")]
