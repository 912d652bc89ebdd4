"""The example's views: every route below works on the tenant of the request's host."""

from __future__ import annotations

from flask import Blueprint, g, jsonify, request
from flask.typing import ResponseReturnValue

from flask_tenant_jobs import current_tenant

from . import db
from .jobs import process_order
from .models import Order

bp = Blueprint("shop", __name__)


@bp.get("/")
def index() -> ResponseReturnValue:
    """Which tenant this host belongs to (``null`` on the apex domain)."""
    return jsonify(tenant=g.tenant)


@bp.get("/orders")
def list_orders() -> ResponseReturnValue:
    """The current tenant's orders; the query needs no ``tenant_id`` filter."""
    orders = db.session.scalars(db.select(Order).order_by(Order.id))
    return jsonify(tenant=current_tenant(), orders=[o.to_dict() for o in orders])


@bp.post("/orders")
def create_order() -> ResponseReturnValue:
    """Create an order from ``{"item": ...}``; ``tenant_id`` is filled in on flush."""
    data = request.get_json(silent=True) or {}
    item = data.get("item")
    if not isinstance(item, str) or not item.strip():
        return jsonify(error='Send JSON like {"item": "anvil"}.'), 400
    order = Order(item=item.strip()[:100])
    db.session.add(order)
    db.session.commit()
    job = process_order.delay(order.id)  # carries this request's tenant to the worker
    return jsonify({**order.to_dict(), "job": job.id}), 201


@bp.get("/jobs/<job_id>")
def job_status(job_id: str) -> ResponseReturnValue:
    """The state of a job (``PENDING``, ``SUCCESS``, ...) and its result once done."""
    result = process_order.AsyncResult(job_id)
    done = result.successful()
    return jsonify(job=job_id, state=result.state, result=result.result if done else None)
