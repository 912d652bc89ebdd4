"""A request without a usable tenant: a 404 that is logged when the view caused it, goes
through the app's own 404 handler, and answers JSON to JSON clients."""

from __future__ import annotations

import logging
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Blueprint, Flask, jsonify
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column
from werkzeug.exceptions import NotFound

from flask_tenant_jobs import SchemaNotFoundError, TenantJobs, TenantScoped, tenant_task

from .core_app import make_app, tables

db = SQLAlchemy()
JSON = {"Accept": "application/json"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


class Memo(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "resp_memo"
    id: Mapped[int] = mapped_column(primary_key=True)


@tenant_task
def archive_memos() -> None:
    """A tenant task, sent by a view."""


def add_views(app: Flask) -> None:
    @app.get("/memos")
    def memos() -> dict[str, int]:
        return {"count": len(db.session.scalars(sa.select(Memo)).all())}

    @app.post("/archive")
    def archive() -> dict[str, str]:
        archive_memos.delay()
        return {"sent": "yes"}

    @app.get("/memos/<label>")
    def labelled_memos(label: str) -> dict[str, int]:
        return {"count": len(db.session.scalars(sa.select(Memo)).all())}


@pytest.fixture
def app(tmp_path: Path) -> t.Iterator[Flask]:
    app, _ = make_app(
        db,
        f"sqlite:///{tmp_path / 'responses.db'}",
        CELERY={"broker_url": "memory://", "task_always_eager": True},
    )
    add_views(app)
    with tables(app, db):
        yield app


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_query_without_a_tenant_is_a_logged_404(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        response = app.test_client().get("http://example.test/memos", headers=BROWSER)
    assert response.status_code == 404
    assert response.mimetype == "text/html"
    assert "This page belongs to a tenant" in response.get_data(as_text=True)
    (message,) = warnings_of(caplog)
    assert message.startswith("NoTenantError in view 'memos' (GET example.test/memos)")
    assert "Querying a tenant-scoped model needs a current tenant" in message


def test_sending_a_tenant_task_without_a_tenant_is_a_logged_404(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        response = app.test_client().post("http://example.test/archive", json={})
    assert response.status_code == 404
    (message,) = warnings_of(caplog)
    assert "in view 'archive' (POST example.test/archive)" in message
    assert "Sending the tenant task" in message and "delay_for_each_tenant()" in message


def test_json_clients_get_json(app: Flask) -> None:
    response = app.test_client().get("http://example.test/memos", headers=JSON)
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    assert response.get_json() == {
        "error": "This page belongs to a tenant: use a tenant's address.",
        "status": 404,
    }
    assert response.headers["Vary"] == "Accept"


def test_the_column_strategy_leaves_the_schema_strategys_errors_alone(app: Flask) -> None:
    """Each strategy answers its own errors (the schema strategy's: tests/test_schema.py)."""
    assert SchemaNotFoundError not in app.error_handler_spec[None][None]


def test_a_json_request_body_gets_json_too(app: Flask) -> None:
    response = app.test_client().post("http://example.test/archive", json={"all": True})
    assert response.status_code == 404
    assert response.get_json() == {
        "error": "This page belongs to a tenant: use a tenant's address.",
        "status": 404,
    }


def test_an_unknown_tenant_answers_json_to_json_clients_without_a_log(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = app.test_client()
    with caplog.at_level(logging.WARNING):
        response = client.get("http://umbrella.example.test/memos", headers=JSON)
        html = client.get("http://umbrella.example.test/memos", headers=BROWSER)
    assert response.status_code == 404
    assert response.get_json() == {"error": "No such tenant.", "status": 404}
    assert html.status_code == 404 and html.mimetype == "text/html"
    assert "No such tenant." in html.get_data(as_text=True)
    assert warnings_of(caplog) == []  # an unknown host is routine, not a bug of the app


@pytest.mark.parametrize(
    "url",
    [
        "http://example.test/memos",
        "http://umbrella.example.test/memos",
    ],
)
def test_the_apps_own_404_handler_answers(app: Flask, url: str) -> None:
    seen: list[NotFound] = []

    @app.errorhandler(404)
    def not_found(error: NotFound) -> tuple[t.Any, int]:
        seen.append(error)
        return jsonify(shop="not here", why=error.description), 404

    response = app.test_client().get(url)
    assert response.status_code == 404
    assert response.get_json()["shop"] == "not here"
    assert isinstance(seen[0], NotFound)


def test_a_blueprints_404_handler_answers_for_its_views(tmp_path: Path) -> None:
    app, _ = make_app(db, f"sqlite:///{tmp_path / 'bp.db'}")
    shop = Blueprint("shop", __name__)

    @shop.get("/memos")
    def memos() -> dict[str, int]:
        return {"count": len(db.session.scalars(sa.select(Memo)).all())}

    @shop.errorhandler(404)
    def shop_not_found(error: NotFound) -> tuple[str, int]:
        return "the shop has no such page", 404

    app.register_blueprint(shop)
    with tables(app, db):
        response = app.test_client().get("http://example.test/memos")
    assert (response.status_code, response.get_data(as_text=True)) == (
        404,
        "the shop has no such page",
    )


def test_a_users_own_handler_for_the_error_still_wins(app: Flask) -> None:
    from flask_tenant_jobs import NoTenantError

    @app.errorhandler(NoTenantError)
    def choose_a_shop(error: NoTenantError) -> tuple[str, int]:
        return "pick a shop first", 400

    response = app.test_client().get("http://example.test/memos")
    assert (response.status_code, response.get_data(as_text=True)) == (400, "pick a shop first")


def test_tenant_requests_are_unaffected(app: Flask) -> None:
    with app.app_context(), app.extensions["tenant_jobs"].switch("acme"):
        db.session.add(Memo())
        db.session.commit()
    client = app.test_client()
    assert client.get("http://acme.example.test/memos").get_json() == {"count": 1}
    assert client.post("http://acme.example.test/archive", json={}).get_json() == {"sent": "yes"}


def test_init_app_on_an_app_factory_registers_the_handlers_per_app(tmp_path: Path) -> None:
    tenant_jobs = TenantJobs()
    apps = []
    for name in ("one", "two"):
        app = Flask(name)
        app.config.update(
            SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / name}.db",
            SERVER_NAME="example.test",
            TENANT_JOBS_TENANTS=["acme"],
        )
        db.init_app(app)
        tenant_jobs.init_app(app, db=db)
        add_views(app)
        apps.append(app)
    for app in apps:
        response = app.test_client().get("http://example.test/memos", headers=JSON)
        assert response.status_code == 404 and response.is_json


def test_a_url_cannot_forge_log_lines(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        response = app.test_client().get(
            "http://example.test/memos/x%0AWARNING%20forged%0D%1b[31m"
        )
    assert response.status_code == 404
    (message,) = warnings_of(caplog)
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    assert "(GET example.test/memos/x\\nWARNING forged\\r\\x1b[31m)" in message
