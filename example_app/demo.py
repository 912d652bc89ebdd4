"""``python -m example_app demo``: real requests through the test client, no server needed."""

from __future__ import annotations

import typing as t
from dataclasses import dataclass, field

from celery.contrib.testing.worker import start_worker
from flask import Flask
from sqlalchemy.engine import make_url

from . import broker, create_app, db, jobs, tenant_jobs
from .models import reset_db

ORDERS = [("acme", "anvil"), ("acme", "rocket skates"), ("globex", "hammock")]
UNKNOWN = "initech"
#: The pages answer HTML unless the client asks for JSON.
JSON = {"Accept": "application/json"}


@dataclass
class DemoResult:
    """What each tenant saw, and the status codes of the requests without a tenant."""

    seen: dict[str, list[str]] = field(default_factory=dict)
    unknown_status: int = 0
    apex_tenant: str | None = "?"
    apex_orders_status: int = 0
    own_order_status: int = 0
    foreign_order_status: int = 0

    @property
    def isolated(self) -> bool:
        expected: dict[str, list[str]] = {}
        for tenant, item in ORDERS:
            expected.setdefault(tenant, []).append(item)
        return (
            self.seen == expected
            and self.unknown_status == 404
            and self.apex_tenant is None
            and self.apex_orders_status == 404
            and self.own_order_status == 200
            and self.foreign_order_status == 404
        )


def run_demo(app: Flask | None = None, out: t.Callable[[str], None] = print) -> DemoResult:
    """Reset the tables, create orders as two tenants and show what each one sees."""
    app = app or create_app()
    server = app.config["SERVER_NAME"]
    with app.app_context():
        out(f"Database: {make_url(str(db.engine.url)).render_as_string(hide_password=True)} "
            f"({describe_strategy(app)})")
        reset_db()
    client = app.test_client()
    result = DemoResult()

    def url(tenant: str | None, path: str) -> str:
        return f"http://{tenant + '.' if tenant else ''}{server}{path}"

    out("")
    order_ids = []
    for tenant, item in ORDERS:
        response = client.post(url(tenant, "/orders"), json={"item": item})
        body = response.get_json()
        order_ids.append(body["id"])
        out(f"POST {url(tenant, '/orders')} {{'item': {item!r}}} -> {response.status_code}, "
            f"order {body['id']} of {body['tenant']}")

    out("")
    for tenant in sorted({name for name, _ in ORDERS}):
        response = client.get(url(tenant, "/orders"), headers=JSON)
        items = [order["item"] for order in response.get_json()["orders"]]
        result.seen[tenant] = items
        noun = "order" if len(items) == 1 else "orders"
        out(f"GET {url(tenant, '/orders')} -> {response.status_code}: "
            f"{tenant} sees {len(items)} {noun}: {', '.join(items)}")

    acme_order = order_ids[1]  # globex has an order 1 of its own with the schema strategy
    response = client.get(url("acme", f"/orders/{acme_order}"), headers=JSON)
    result.own_order_status = response.status_code
    out(f"GET {url('acme', f'/orders/{acme_order}')} -> {response.status_code}: acme reads "
        f"its order {acme_order}")
    response = client.get(url("globex", f"/orders/{acme_order}"), headers=JSON)
    result.foreign_order_status = response.status_code
    out(f"GET {url('globex', f'/orders/{acme_order}')} -> {response.status_code}: globex may "
        f"not read acme's order ({response.get_json()['error']})")

    response = client.get(url(UNKNOWN, "/orders"), headers=JSON)
    result.unknown_status = response.status_code
    out(f"GET {url(UNKNOWN, '/orders')} -> {response.status_code} (unknown tenant)")

    response = client.get(url(None, "/"), headers=JSON)
    result.apex_tenant = response.get_json()["tenant"]
    out(f"GET {url(None, '/')} -> {response.status_code}: tenant is {result.apex_tenant}")

    response = client.get(url(None, "/orders"), headers=JSON)
    result.apex_orders_status = response.status_code
    out(f"GET {url(None, '/orders')} -> {response.status_code} (orders belong to a tenant; "
        "the app logs a warning)")

    out("")
    if result.isolated:
        out("Isolation holds: each tenant sees only its own orders.")
    else:
        out("ISOLATION BROKEN: see the requests above.")
    return result


@dataclass
class JobsResult:
    """What the jobs reported, per tenant."""

    processed: dict[str, list[str]] = field(default_factory=dict)
    foreign_job_status: int = 0
    reports: dict[str, dict[str, int]] = field(default_factory=dict)
    digests: list[str] = field(default_factory=list)
    everywhere: dict[str, int] = field(default_factory=dict)
    nightly: dict[str, str] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return (
            self.processed == {"acme": ["processed", "processed"], "globex": ["processed"]}
            and self.foreign_job_status == 404
            and self.reports == {"acme": {"processed": 2}, "globex": {"processed": 1}}
            and self.digests == ["acme: 2 orders in the shop", "globex: 1 orders in the shop"]
            and self.everywhere == {"acme": 2, "globex": 1}
            and self.nightly == {"acme": "nightly", "globex": "nightly"}
        )


def run_jobs_demo(app: Flask | None = None, out: t.Callable[[str], None] = print) -> JobsResult:
    """Orders placed through requests are processed by a worker, each in its tenant.

    The embedded broker is emptied before and after (what an interrupted run left,
    and this run's results); a real broker's queues are never touched.
    """
    app = app or create_app()
    celery_app = app.extensions["celery"]
    embedded = broker.is_embedded(celery_app)
    with app.app_context():
        reset_db()
    if embedded:
        broker.empty(celery_app)
    where = "the embedded broker " if embedded else ""
    out("")
    out(f"Jobs: an in-process worker on {where}{celery_app.conf.broker_url}")
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
            return _run_jobs(app, out)
    finally:
        if embedded:
            broker.empty(celery_app)


def _run_jobs(app: Flask, out: t.Callable[[str], None]) -> JobsResult:
    """Send the example's jobs through requests and directly, and wait for each result."""
    server = app.config["SERVER_NAME"]
    client = app.test_client()
    result = JobsResult()
    job_ids = []
    for tenant, item in ORDERS:
        body = client.post(f"http://{tenant}.{server}/orders", json={"item": item}).get_json()
        job_ids.append((tenant, body["job"]))
    for tenant, job_id in job_ids:
        with app.app_context(), tenant_jobs.switch(tenant):  # a result reads in its tenant
            done = wait(jobs.process_order.AsyncResult(job_id))
        result.processed.setdefault(tenant, []).append(done["status"])
        page = client.get(f"http://{tenant}.{server}/jobs/{job_id}", headers=JSON)
        out(f"process_order({done['order']}) ran in {done['tenant']}: {done['status']} "
            f"(GET /jobs/... -> {page.get_json()['state']})")
    acme_job = job_ids[0][1]
    page = client.get(f"http://globex.{server}/jobs/{acme_job}", headers=JSON)
    result.foreign_job_status = page.status_code
    out(f"GET http://globex.{server}/jobs/<acme's job> -> {page.status_code}: globex may not "
        f"read acme's job ({page.get_json()['error']})")
    with app.app_context():
        sent = {}
        for tenant in tenant_jobs.tenant_names():
            with tenant_jobs.switch(tenant):
                sent[tenant] = (
                    jobs.order_report.delay("weekly", ["processed"]),
                    jobs.send_digest.apply_async(countdown=1),
                )
        for report, digest in sent.values():
            done = wait(report)
            result.reports[done["tenant"]] = done["counts"]
            out(f"order_report('weekly') ran in {done['tenant']}: {done['counts']}")
            result.digests.append(wait(digest))
            out(f"send_digest (sent with countdown=1) ran: {result.digests[-1]}")
        result.everywhere = wait(jobs.count_orders_everywhere.delay())
        out(f"count_orders_everywhere (a plain task visiting each tenant): {result.everywhere}")
        for job_id in wait(jobs.start_nightly_reports.delay()):
            with tenant_jobs.without_tenant():  # every tenant's report, deliberately
                done = wait(jobs.order_report.AsyncResult(job_id))
            result.nightly[done["tenant"]] = done["kind"]
        out(f"start_nightly_reports sent one order_report per tenant: {result.nightly}")
    out("")
    out("Jobs hold too: each job ran in its own tenant." if result.correct
        else "JOBS BROKEN: see the lines above.")
    return result


def wait(result: t.Any) -> t.Any:
    """The job's return value, polling the result backend every 50 ms (30 s at most)."""
    return result.get(timeout=30, interval=0.05)


def describe_strategy(app: Flask) -> str:
    """``column strategy``, or the schema strategy with the tenants' schemas."""
    if app.config.get("TENANT_JOBS_STRATEGY") != "schema":
        return "column strategy"
    schemas = [tenant_jobs.describe(name)["schema"] for name in tenant_jobs.tenant_names()]
    return f"schema strategy: schemas {', '.join(schemas)}"
