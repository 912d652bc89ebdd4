"""The example app: its demo proves isolation (in-process, as ``python -m example_app demo``,
against the real PostgreSQL, on both strategies), and its HTML pages work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # example_app lives in the repository, it is not installed
    sys.path.insert(0, str(ROOT))

from example_app import TENANTS, celery_config, create_app  # noqa: E402
from example_app.demo import run_demo  # noqa: E402

EXPECTED_LINES = [
    "acme sees 2 orders: anvil, rocket skates",
    "globex sees 1 order: hammock",
    "GET http://initech.example.test/orders -> 404",
    "GET http://example.test/ -> 200: tenant is None",
    "GET http://example.test/orders -> 404",
    "Isolation holds: each tenant sees only its own orders.",
]


def check_demo(database_url: str) -> None:
    lines: list[str] = []
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url})
    result = run_demo(app, out=lines.append)
    output = "\n".join(lines)
    assert result.seen == {"acme": ["anvil", "rocket skates"], "globex": ["hammock"]}, output
    assert result.isolated, output
    for expected in EXPECTED_LINES:
        assert expected in output
    # The demo resets its tables: a second run sees the same, not twice as many.
    assert run_demo(app, out=lambda line: None).seen == result.seen


def test_demo_in_process_sqlite(tmp_path: Path) -> None:
    check_demo(f"sqlite:///{tmp_path / 'demo.sqlite3'}")


def test_demo_postgres(postgres_url: str) -> None:
    check_demo(postgres_url)


def test_demo_command(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}"}
    env.pop("FLASK_SERVER_NAME", None)
    done = subprocess.run(
        [sys.executable, "-m", "example_app", "demo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in EXPECTED_LINES + JOBS_LINES:
        assert expected in done.stdout


def test_post_validates_and_apex_has_no_tenant(tmp_path: Path) -> None:
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'app.sqlite3'}"})
    client = app.test_client()
    response = client.post("http://acme.example.test/orders", json={"item": " "})
    assert response.status_code == 400
    response = client.post("http://acme.example.test/orders", json={"item": "anvil"})
    assert response.status_code == 201
    assert response.get_json()["status"] == "pending"
    assert response.get_json()["tenant"] == "acme"
    assert response.get_json()["job"]
    json_only = {"Accept": "application/json"}
    orders = client.get("http://globex.example.test/orders", headers=json_only).get_json()
    assert orders == {"tenant": "globex", "orders": []}
    assert client.get("http://example.test/", headers=json_only).get_json() == {"tenant": None}


def test_flask_finds_the_factory() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "example_app", "routes"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "DATABASE_URL": "sqlite://"},
    )
    assert done.returncode == 0, done.stderr
    assert "/orders" in done.stdout


JOBS_LINES = [
    "process_order(1) ran in acme: processed (GET /jobs/... -> SUCCESS)",
    "process_order(3) ran in globex: processed (GET /jobs/... -> SUCCESS)",
    "order_report('weekly') ran in acme: {'processed': 2}",
    "send_digest (sent with countdown=1) ran: globex: 1 orders in the shop",
    "count_orders_everywhere (a plain task visiting each tenant): {'acme': 2, 'globex': 1}",
    "start_nightly_reports sent one order_report per tenant: "
    "{'acme': 'nightly', 'globex': 'nightly'}",
    "Jobs hold too: each job ran in its own tenant.",
]


def test_jobs_demo_on_the_embedded_broker(tmp_path: Path) -> None:
    from example_app.demo import run_jobs_demo

    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'jobs.sqlite3'}"})
    lines: list[str] = []
    result = run_jobs_demo(app, out=lines.append)
    output = "\n".join(lines)
    assert result.correct, output
    for expected in JOBS_LINES:
        assert expected in output


def test_jobs_demo_on_redis_and_postgres(
    tmp_path: Path, redis_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from example_app.demo import run_jobs_demo

    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    app = create_app({"SQLALCHEMY_DATABASE_URI": postgres_url})
    assert app.extensions["celery"].conf.broker_url.startswith("redis://")
    result = run_jobs_demo(app, out=lambda line: None)
    assert result.correct


def test_html_pages_form_post_redirects_to_the_job_page(tmp_path: Path) -> None:
    """Browsers get HTML: the orders page, its form (POST -> 303 -> the job's page), and
    the job's page before and after a worker ran the job; JSON only when asked for."""
    from celery.contrib.testing.worker import start_worker

    app = create_app({
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'html.sqlite3'}",
        "CELERY": celery_config(str(tmp_path / "instance")),  # a broker of this test's own
    })
    client = app.test_client()
    acme = "http://acme.example.test"

    page = client.get(f"{acme}/orders")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "Acme Corporation: orders" in html and "No orders yet." in html
    assert '<form method="post" action="/orders">' in html

    response = client.post(f"{acme}/orders", data={"item": "<b>anvil</b>"})
    assert response.status_code == 303
    job_url = response.headers["Location"]
    assert job_url.startswith("/jobs/")
    job_id = job_url.removeprefix("/jobs/")

    html = client.get(acme + job_url).get_data(as_text=True)
    assert "PENDING" in html and 'http-equiv="refresh"' in html
    assert "&lt;b&gt;anvil&lt;/b&gt;" in html and "<b>anvil" not in html  # escaped
    assert client.get("http://globex.example.test" + job_url).status_code == 404
    assert client.get(f"{acme}/jobs/no-such-job").status_code == 404
    html = client.get(f"{acme}/orders").get_data(as_text=True)
    assert f'href="{job_url}"' in html and "pending" in html

    celery_app = app.extensions["celery"]
    with start_worker(celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
        done = celery_app.AsyncResult(job_id).get(timeout=30)
    assert done["tenant"] == "acme" and done["status"] == "processed"
    html = client.get(acme + job_url).get_data(as_text=True)
    assert "SUCCESS" in html and 'http-equiv="refresh"' not in html
    assert "It ran in tenant <code>acme</code>: the order is processed." in html
    state = client.get(acme + job_url, headers={"Accept": "application/json"}).get_json()
    assert state["state"] == "SUCCESS" and state["order"]["status"] == "processed"

    response = client.post(f"{acme}/orders", data={"item": "  "})
    assert response.status_code == 400
    assert "Name the item to order." in response.get_data(as_text=True)

    assert "<b>anvil" not in client.get("http://globex.example.test/orders").get_data(as_text=True)
    html = client.get("http://example.test/").get_data(as_text=True)
    assert 'href="http://acme.example.test/orders"' in html
    assert client.get(f"{acme}/").headers["Location"] == "/orders"


def test_demo_on_the_schema_strategy(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TENANT_JOBS_STRATEGY=schema``: create_app makes each tenant's schema and the shared
    table in the shared schema only; the demo and its jobs hold; the schemas are dropped."""
    from example_app import db, tenant_jobs
    from example_app.demo import run_jobs_demo

    monkeypatch.setenv("TENANT_JOBS_STRATEGY", "schema")
    schema_format = f"example{os.getpid()}_{{tenant}}"  # apart from other tests and runs
    try:
        app = create_app({
            "SQLALCHEMY_DATABASE_URI": postgres_url,
            "TENANT_JOBS_SCHEMA_FORMAT": schema_format,
            "CELERY": celery_config(str(tmp_path / "instance")),
        })
        with app.app_context():
            assert tenant_jobs.settings.strategy == "schema"
            for name in ("acme", "globex"):
                schema = schema_format.format(tenant=name)
                assert tenant_jobs.describe(name)["exists"] == "yes"
                tables = db.session.scalars(
                    db.text("SELECT tablename FROM pg_tables WHERE schemaname = :schema"),
                    {"schema": schema},
                ).all()
                assert tables == ["example_orders"]  # the shared table is not in it
            shops = db.session.scalar(db.text("SELECT to_regclass('public.example_shops')"))
            assert shops is not None

        lines: list[str] = []
        assert run_demo(app, out=lines.append).isolated, "\n".join(lines)
        output = "\n".join(lines)
        assert f"schema strategy: schemas {schema_format.format(tenant='acme')}" in output
        for expected in EXPECTED_LINES:
            assert expected in output
        lines.clear()
        assert run_jobs_demo(app, out=lines.append).correct, "\n".join(lines)
    finally:
        engine = sa.create_engine(postgres_url)
        with engine.begin() as connection:
            for name in TENANTS:
                schema = schema_format.format(tenant=name)
                connection.execute(sa.schema.DropSchema(schema, cascade=True, if_exists=True))
        engine.dispose()
