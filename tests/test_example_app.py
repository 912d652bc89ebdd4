"""The example app: its demo proves isolation (in-process, as ``python -m example_app demo``,
against the real PostgreSQL, on both strategies), its HTML pages work, and its embedded
broker neither loses nor garbles a message nor keeps what it no longer needs (50 demo runs in
a row; ``flask run`` and a worker process)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import typing as t
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # example_app lives in the repository, it is not installed
    sys.path.insert(0, str(ROOT))

from example_app import TENANTS, broker, create_app  # noqa: E402
from example_app.demo import run_demo, run_jobs_demo  # noqa: E402
from tests.worker_processes import FlaskProcess, subprocess_env, wait_until  # noqa: E402

NOTHING_LEFT = {"waiting": 0, "delivered": 0, "results": 0}

EXPECTED_LINES = [
    "acme sees 2 orders: anvil, rocket skates",
    "globex sees 1 order: hammock",
    "GET http://acme.example.test/orders/2 -> 200: acme reads its order 2",
    "GET http://globex.example.test/orders/2 -> 404: globex may not read acme's order "
    "(No such order in this shop.)",
    "GET http://initech.example.test/orders -> 404",
    "GET http://example.test/ -> 200: tenant is None",
    "GET http://example.test/orders -> 404",
    "Isolation holds: each tenant sees only its own orders.",
]


def check_demo(database_url: str, instance: Path) -> None:
    lines: list[str] = []
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url}, instance_path=str(instance))
    result = run_demo(app, out=lines.append)
    output = "\n".join(lines)
    assert result.seen == {"acme": ["anvil", "rocket skates"], "globex": ["hammock"]}, output
    assert result.isolated, output
    for expected in EXPECTED_LINES:
        assert expected in output
    # The demo resets its tables: a second run sees the same, not twice as many.
    assert run_demo(app, out=lambda line: None).seen == result.seen


def test_demo_in_process_sqlite(tmp_path: Path) -> None:
    check_demo(f"sqlite:///{tmp_path / 'demo.sqlite3'}", tmp_path)


def test_demo_postgres(postgres_url: str, tmp_path: Path) -> None:
    check_demo(postgres_url, tmp_path)


#: Runs ``python -m example_app`` as if the Redis client were not installed, as after
#: the README's ``pip install -e .`` (no extras).
WITHOUT_REDIS = (
    "import runpy, sys; sys.modules['redis'] = None; sys.argv[0] = 'example_app'; "
    "runpy.run_module('example_app', run_name='__main__', alter_sys=True)"
)


@pytest.mark.parametrize("redis_client", ["installed", "not installed"])
def test_demo_command(tmp_path: Path, redis_client: str) -> None:
    """``python -m example_app demo`` with its defaults (SQLite, the embedded broker),
    also without the Redis client, which the README's plain install does not bring."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "CELERY_"))}
    env.pop("DATABASE_URL", None)
    env.pop("TENANT_JOBS_STRATEGY", None)
    start = ["-m", "example_app"] if redis_client == "installed" else ["-c", WITHOUT_REDIS]
    done = subprocess.run(
        [sys.executable, *start, "demo", "--instance", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in EXPECTED_LINES + JOBS_LINES:
        assert expected in done.stdout


def test_post_validates_and_apex_has_no_tenant(tmp_path: Path) -> None:
    app = create_app(instance_path=str(tmp_path))
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
    "GET http://globex.example.test/jobs/<acme's job> -> 404: globex may not read acme's job "
    "(Not found.)",
    "order_report('weekly') ran in acme: {'processed': 2}",
    "send_digest (sent with countdown=1) ran: globex: 1 orders in the shop",
    "count_orders_everywhere (a plain task visiting each tenant): {'acme': 2, 'globex': 1}",
    "start_nightly_reports sent one order_report per tenant: "
    "{'acme': 'nightly', 'globex': 'nightly'}",
    "Jobs hold too: each job ran in its own tenant.",
]


def test_jobs_demo_on_the_embedded_broker(tmp_path: Path) -> None:
    app = create_app(instance_path=str(tmp_path))
    lines: list[str] = []
    result = run_jobs_demo(app, out=lines.append)
    output = "\n".join(lines)
    assert result.correct, output
    for expected in JOBS_LINES:
        assert expected in output
    assert broker.leftovers(app.extensions["celery"]) == NOTHING_LEFT


def test_jobs_demo_on_redis_and_postgres(
    tmp_path: Path, redis_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    app = create_app({"SQLALCHEMY_DATABASE_URI": postgres_url}, instance_path=str(tmp_path))
    assert app.extensions["celery"].conf.broker_url.startswith("redis://")
    result = run_jobs_demo(app, out=lambda line: None)
    assert result.correct


def test_html_pages_form_post_redirects_to_the_job_page(tmp_path: Path) -> None:
    """Browsers get HTML: the orders page, its form (POST -> 303 -> the job's page), and
    the job's page before and after a worker ran the job; JSON only when asked for."""
    from celery.contrib.testing.worker import start_worker

    app = create_app(instance_path=str(tmp_path))  # a database and broker of its own
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
    monkeypatch.setenv("TENANT_JOBS_STRATEGY", "schema")
    schema_format = f"example{os.getpid()}_{{tenant}}"  # apart from other tests and runs
    try:
        app = create_app(
            {"SQLALCHEMY_DATABASE_URI": postgres_url, "TENANT_JOBS_SCHEMA_FORMAT": schema_format},
            instance_path=str(tmp_path),
        )
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


# -- the embedded broker ------------------------------------------------------------------


DEMO_RUNS = 50


@pytest.mark.slow
def test_the_demo_passes_50_runs_in_a_row_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """``python -m example_app demo``'s steps, 50 times, each with a fresh app (as a fresh
    process has) on the same embedded broker: every run isolated and every job right, and
    after each run no message waiting or delivered and no result left."""
    for run in range(1, DEMO_RUNS + 1):
        app = create_app(instance_path=str(tmp_path))
        lines: list[str] = []
        try:
            isolated = run_demo(app, out=lines.append).isolated
            correct = run_jobs_demo(app, out=lines.append).correct
            left = broker.leftovers(app.extensions["celery"])
        finally:
            dispose(app)
        assert isolated and correct, f"run {run} of {DEMO_RUNS}:\n" + "\n".join(lines)
        assert left == NOTHING_LEFT, f"run {run} of {DEMO_RUNS} left {left}"


def dispose(app: t.Any) -> None:
    """Close the database connections and the Celery app of a finished run."""
    from example_app import db

    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    app.extensions["celery"].close()


def test_what_an_interrupted_run_left_is_purged(tmp_path: Path) -> None:
    """Messages queued with no worker (a run stopped before its jobs) and old results are
    gone after the next run, and none of them ran in it."""
    app = create_app(instance_path=str(tmp_path))
    celery_app = app.extensions["celery"]
    run_demo(app, out=lambda line: None)  # three process_order jobs queued, no worker
    celery_app.backend.store_result("an-old-job", {"tenant": "acme"}, "SUCCESS")
    assert broker.leftovers(celery_app) == {"waiting": 3, "delivered": 0, "results": 1}
    lines: list[str] = []
    assert run_jobs_demo(app, out=lines.append).correct, "\n".join(lines)
    assert broker.leftovers(celery_app) == NOTHING_LEFT
    dispose(app)


def test_a_real_broker_is_never_purged(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    app = create_app(instance_path=str(tmp_path))
    assert not broker.is_embedded(app.extensions["celery"])
    purged: list[t.Any] = []
    monkeypatch.setattr(broker, "empty", purged.append)
    assert run_jobs_demo(app, out=lambda line: None).correct
    assert purged == []
    dispose(app)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class WebServer:
    """``flask --app APP run`` on a free port; requests name their host in ``Host``."""

    def __init__(self, app: str, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", app, "run", "--port", str(self.port)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def request(self, method: str, host: str, path: str, body: t.Any = None) -> tuple[int, t.Any]:
        """Send a JSON request as ``host``; return the status and the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Host": host, "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def is_up(self) -> bool:
        try:
            return self.request("GET", "example.test", "/")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()


@pytest.mark.slow
def test_flask_run_and_a_worker_process_share_the_embedded_broker(tmp_path: Path) -> None:
    """The README's two commands as two processes on the embedded broker: orders placed while
    no worker runs wait for it; 60 orders placed from 3 threads at once while a prefork worker
    takes them are each processed once, in their tenant; one tenant cannot read another's job
    or order; a restarted worker deletes the delivered messages of the one before."""
    app_spec = f"example_app:create_app(instance_path={str(tmp_path)!r})"
    env = subprocess_env("CELERY_", "DATABASE_URL", "TENANT_JOBS_STRATEGY")
    web = WebServer(app_spec, env, tmp_path / "web.log")
    workers: list[FlaskProcess] = []

    def start_worker() -> FlaskProcess:
        log = tmp_path / f"worker{len(workers)}.log"
        workers.append(FlaskProcess(app_spec, ["worker", "-c", "2", "-l", "info"], env, log))
        return workers[-1]

    def logs() -> str:
        return "\n".join([web.log(), *(w.log() for w in workers)])

    def order(tenant: str, item: str) -> dict[str, t.Any]:
        status, body = web.request("POST", f"{tenant}.example.test", "/orders", {"item": item})
        assert status == 201, (status, body)
        return t.cast(dict[str, t.Any], body)

    def job(tenant: str, job_id: str) -> tuple[int, t.Any]:
        return web.request("GET", f"{tenant}.example.test", f"/jobs/{job_id}")

    def processed(placed: list[tuple[str, dict[str, t.Any]]]) -> bool:
        return all(job(tenant, o["job"])[1]["state"] == "SUCCESS" for tenant, o in placed)

    try:
        wait_until(web.is_up, 30, "flask run answering", logs)
        early = [("acme", order("acme", "anvil")), ("globex", order("globex", "hammock"))]
        assert job("acme", early[0][1]["job"])[1]["state"] == "PENDING"  # no worker yet
        start_worker()
        wait_until(lambda: processed(early), 60, "the orders placed before the worker", logs)

        many: list[tuple[str, dict[str, t.Any]]] = []
        with ThreadPoolExecutor(3) as pool:
            futures = [
                (tenant, pool.submit(order, tenant, f"{tenant}-{i}"))
                for i in range(20) for tenant in ("acme", "globex", "acme")
            ]
            many = [(tenant, future.result()) for tenant, future in futures]
        wait_until(lambda: processed(many), 90, "60 orders placed at once", logs)
        for tenant, placed in early + many:
            page = job(tenant, placed["job"])[1]
            assert page["result"] == {"tenant": tenant, "order": placed["id"],
                                      "status": "processed"}
            assert page["order"]["tenant"] == tenant
        received = "\n".join(w.log(tail=10**7) for w in workers).count("received")
        assert received == len(early) + len(many)  # each message delivered exactly once

        acme_job, acme_order = early[0][1]["job"], early[0][1]["id"]
        assert job("globex", acme_job) == (404, {"error": "Not found."})  # its result's tenant
        assert web.request("GET", "globex.example.test", f"/orders/{acme_order}") == (
            404, {"error": "No such order in this shop."}
        )

        celery_app = create_app(instance_path=str(tmp_path)).extensions["celery"]
        assert broker.leftovers(celery_app)["delivered"] == len(early) + len(many)
        workers[-1].stop()
        late = [("globex", order("globex", "deck chair"))]
        start_worker()
        wait_until(lambda: processed(late), 60, "an order placed while no worker ran", logs)
        assert broker.leftovers(celery_app) == {"waiting": 0, "delivered": 1,
                                                "results": len(early) + len(many) + 1}
        assert "Traceback" not in logs()
    finally:
        for worker in workers:
            worker.stop()
        web.stop()


def test_the_queue_page_says_fairness_needs_redis_on_the_embedded_broker(tmp_path: Path) -> None:
    app = create_app(instance_path=str(tmp_path))
    assert app.config["TENANT_JOBS_FAIR_DISPATCH"] is False
    client = app.test_client()
    html = client.get("http://acme.example.test/queue").get_data(as_text=True)
    assert "Fair dispatch needs Redis" in html and "CELERY_BROKER_URL=redis://" in html
    assert "Fair dispatch needs Redis" in client.get("http://example.test/queue").get_data(
        as_text=True
    )
    answer = client.get("http://acme.example.test/queue", headers={"Accept": "application/json"})
    assert answer.get_json() == {"fair_dispatch": False, "waiting": None}
    assert 'href="/queue"' in client.get("http://acme.example.test/orders").get_data(as_text=True)
    dispose(app)


def test_on_redis_fair_dispatch_is_on_and_the_queue_page_shows_the_backlog(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs sent with no worker wait per shop; each shop's page shows its own count only,
    the apex domain every shop's; a worker then runs them all."""
    from celery.contrib.testing.worker import start_worker

    from tests.worker_processes import redis_db_url

    url = redis_db_url(redis_url, int(os.environ.get("TEST_EXAMPLE_REDIS_DB", "11")))
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    app = create_app(instance_path=str(tmp_path))
    celery_app = app.extensions["celery"]
    assert app.config["TENANT_JOBS_FAIR_DISPATCH"] is True
    assert celery_app.conf.broker_transport == "flask_tenant_jobs.fair.transport:FairTransport"
    with celery_app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    client = app.test_client()
    as_json = {"Accept": "application/json"}
    try:
        for shop, item in [("acme", "anvil"), ("acme", "rocket"), ("globex", "hammock")]:
            response = client.post(f"http://{shop}.example.test/orders", json={"item": item})
            assert response.status_code == 201
        assert client.get("http://acme.example.test/queue", headers=as_json).get_json() == {
            "fair_dispatch": True, "waiting": {"acme": 2}
        }
        globex = client.get("http://globex.example.test/queue").get_data(as_text=True)
        assert "<td>globex</td><td>1</td>" in globex and "acme" not in globex
        apex = client.get("http://example.test/queue").get_data(as_text=True)
        assert "<td>acme</td><td>2</td>" in apex and "<td>globex</td><td>1</td>" in apex
        assert "Fair dispatch is on" in apex
        def backlog() -> dict[str, int]:
            with app.app_context():
                return t.cast(dict[str, int], app.extensions["tenant_jobs"].backlog())

        def processed() -> list[str]:
            return [
                order["status"]
                for shop in ("acme", "globex")
                for order in client.get(f"http://{shop}.example.test/orders",
                                        headers=as_json).get_json()["orders"]
            ]

        assert processed() == ["pending"] * 3
        with start_worker(celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
            wait_until(lambda: processed() == ["processed"] * 3, 30, "the jobs waiting ran")
        assert backlog() == {}
        assert client.get("http://example.test/queue", headers=as_json).get_json() == {
            "fair_dispatch": True, "waiting": {"acme": 0, "globex": 0}
        }
    finally:
        with celery_app.connection_for_write() as connection:
            connection.default_channel.client.flushdb()
        dispose(app)
