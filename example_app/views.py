"""The example's views: every route below works on the tenant of the request's host.

Each page is HTML for browsers and JSON for clients that ask for it
(``Accept: application/json``); ``POST /orders`` takes a form (then redirects to
the job's page) or a JSON body (then answers JSON).
"""

from __future__ import annotations

import typing as t
from uuid import uuid4

from celery import states
from flask import (
    Blueprint,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from flask_tenant_jobs import current_tenant

from . import db, tenant_jobs
from .jobs import process_order
from .models import Order, Shop

bp = Blueprint("shop", __name__)


def wants_json() -> bool:
    """Whether the client prefers JSON to HTML (browsers and curl get HTML)."""
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def shop_title() -> str:
    """The current tenant's display name, from the shared ``Shop`` table."""
    shop = db.session.get(Shop, current_tenant())
    return shop.title if shop is not None else str(current_tenant())


@bp.get("/")
def index() -> ResponseReturnValue:
    """Which tenant this host belongs to (``null`` on the apex domain)."""
    if wants_json():
        return jsonify(tenant=g.tenant)
    if g.tenant is not None:
        return redirect(url_for("shop.list_orders"))
    shops = [(name, f"{request.scheme}://{name}.{request.host}{url_for('shop.list_orders')}")
             for name in tenant_jobs.tenant_names()]
    return render_template("index.html", shops=shops)


@bp.get("/orders")
def list_orders() -> ResponseReturnValue:
    """The current tenant's orders; the query needs no ``tenant_id`` filter."""
    orders = db.session.scalars(db.select(Order).order_by(Order.id)).all()
    if wants_json():
        return jsonify(tenant=current_tenant(), orders=[o.to_dict() for o in orders])
    return render_template("orders.html", title=shop_title(), orders=orders, error=None)


@bp.get("/orders/<int:order_id>")
def show_order(order_id: int) -> ResponseReturnValue:
    """One order of the current tenant (HTML: its job's page).

    ``db.session.get`` is scoped to the tenant: another tenant's order id is a 404.
    """
    order = db.session.get(Order, order_id)
    if order is None:
        abort(404, description="No such order in this shop.")
    if wants_json():
        return jsonify(order.to_dict())
    if order.job_id is None:
        return redirect(url_for("shop.list_orders"))
    return redirect(url_for("shop.job_status", job_id=order.job_id))


@bp.post("/orders")
def create_order() -> ResponseReturnValue:
    """Create an order from a form or from JSON ``{"item": ...}`` and enqueue its job.

    ``tenant_id`` is filled in on flush, and the job carries this request's
    tenant to the worker. A form is answered with a redirect to the job's page.
    """
    data: t.Mapping[str, t.Any] = (
        (request.get_json(silent=True) or {}) if request.is_json else request.form
    )
    item = data.get("item")
    if not isinstance(item, str) or not item.strip():
        if request.is_json:
            return jsonify(error='Send JSON like {"item": "anvil"}.'), 400
        orders = db.session.scalars(db.select(Order).order_by(Order.id)).all()
        error = "Name the item to order."
        return render_template("orders.html", title=shop_title(), orders=orders, error=error), 400
    order = Order(item=item.strip()[:100], job_id=str(uuid4()))
    db.session.add(order)
    db.session.commit()  # commit before enqueueing: the worker must find the row
    process_order.apply_async((order.id,), task_id=order.job_id)
    if request.is_json:
        return jsonify(order.to_dict()), 201
    return redirect(url_for("shop.job_status", job_id=order.job_id), 303)


@bp.get("/jobs/<job_id>")
def job_status(job_id: str) -> ResponseReturnValue:
    """The state of an order's job (``PENDING``, ``SUCCESS``, ...) and its result once done.

    ``process_order.AsyncResult`` reads a job in the request's tenant only: another
    tenant's job is a 404 (the extension answers its ``TenantMismatchError``). A job
    not stored yet reads as ``PENDING`` whoever asks; its order, which the page
    shows, is found in this tenant's orders only, so an id of no order here is a 404.
    """
    result = process_order.AsyncResult(job_id)
    state = result.state
    order = db.session.scalar(db.select(Order).where(Order.job_id == job_id))
    if order is None:
        abort(404, description="No such job in this shop.")
    done = result.successful()
    if wants_json():
        return jsonify(job=job_id, state=state, result=result.result if done else None,
                       order=order.to_dict())
    return render_template(
        "job.html", title=shop_title(), job_id=job_id, state=state, order=order,
        result=result.result if done else None, finished=state in states.READY_STATES,
    )


@bp.get("/queue")
def queue() -> ResponseReturnValue:
    """Jobs waiting per shop: this shop's on its own host, every shop's on the apex domain.

    ``backlog()`` needs fair dispatch, which needs Redis: on the embedded broker the
    page says so instead.
    """
    fair = bool(current_app.config["TENANT_JOBS_FAIR_DISPATCH"])
    waiting = tenant_jobs.backlog() if fair else {}
    shops = [g.tenant] if g.tenant is not None else tenant_jobs.tenant_names()
    rows = [(name, waiting.get(name, 0)) for name in shops]
    if wants_json():
        return jsonify(fair_dispatch=fair, waiting=dict(rows) if fair else None)
    title = shop_title() if g.tenant is not None else "The example shop"
    return render_template("queue.html", title=title, fair=fair, rows=rows)


@bp.app_errorhandler(404)
def not_found(error: HTTPException) -> ResponseReturnValue:
    """Every 404 of the app, also the extension's (unknown tenant, a page that needs one):
    JSON for JSON clients, else Werkzeug's page."""
    if wants_json() or request.is_json:
        return jsonify(error=error.description), 404
    return error
