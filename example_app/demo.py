"""``python -m example_app demo``: real requests through the test client, no server needed."""

from __future__ import annotations

import typing as t
from dataclasses import dataclass, field

from flask import Flask
from sqlalchemy.engine import make_url

from . import create_app, db
from .models import reset_db

ORDERS = [("acme", "anvil"), ("acme", "rocket skates"), ("globex", "hammock")]
UNKNOWN = "initech"


@dataclass
class DemoResult:
    """What each tenant saw, and the status codes of the requests without a tenant."""

    seen: dict[str, list[str]] = field(default_factory=dict)
    unknown_status: int = 0
    apex_tenant: str | None = "?"
    apex_orders_status: int = 0

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
        )


def run_demo(app: Flask | None = None, out: t.Callable[[str], None] = print) -> DemoResult:
    """Reset the tables, create orders as two tenants and show what each one sees."""
    app = app or create_app()
    server = app.config["SERVER_NAME"]
    with app.app_context():
        out(f"Database: {make_url(str(db.engine.url)).render_as_string(hide_password=True)}")
        reset_db()
    client = app.test_client()
    result = DemoResult()

    def url(tenant: str | None, path: str) -> str:
        return f"http://{tenant + '.' if tenant else ''}{server}{path}"

    out("")
    for tenant, item in ORDERS:
        response = client.post(url(tenant, "/orders"), json={"item": item})
        body = response.get_json()
        out(f"POST {url(tenant, '/orders')} {{'item': {item!r}}} -> {response.status_code}, "
            f"order {body['id']} of {body['tenant']}")

    out("")
    for tenant in sorted({name for name, _ in ORDERS}):
        response = client.get(url(tenant, "/orders"))
        items = [order["item"] for order in response.get_json()["orders"]]
        result.seen[tenant] = items
        noun = "order" if len(items) == 1 else "orders"
        out(f"GET {url(tenant, '/orders')} -> {response.status_code}: "
            f"{tenant} sees {len(items)} {noun}: {', '.join(items)}")

    response = client.get(url(UNKNOWN, "/orders"))
    result.unknown_status = response.status_code
    out(f"GET {url(UNKNOWN, '/orders')} -> {response.status_code} (unknown tenant)")

    response = client.get(url(None, "/"))
    result.apex_tenant = response.get_json()["tenant"]
    out(f"GET {url(None, '/')} -> {response.status_code}: tenant is {result.apex_tenant}")

    response = client.get(url(None, "/orders"))
    result.apex_orders_status = response.status_code
    out(f"GET {url(None, '/orders')} -> {response.status_code} (orders belong to a tenant)")

    out("")
    if result.isolated:
        out("Isolation holds: each tenant sees only its own orders.")
    else:
        out("ISOLATION BROKEN: see the requests above.")
    return result
