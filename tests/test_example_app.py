"""The example app's demo proves isolation: in-process, as ``python -m example_app demo``,
and against the real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # example_app lives in the repository, it is not installed
    sys.path.insert(0, str(ROOT))

from example_app import create_app  # noqa: E402
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
    assert client.get("http://globex.example.test/orders").get_json()["orders"] == []
    assert client.get("http://example.test/").get_json() == {"tenant": None}


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
