"""Sessions belong to their tenant: with a cookie domain shared by every tenant's host, a
session made on acme reads as empty on globex and survives the visit; cookies replayed
across hosts or tampered with read as empty; Flask-Login; custom session interfaces."""

from __future__ import annotations

import json
import typing as t
from dataclasses import dataclass

import pytest
from flask import Flask, Request, g, session
from flask.sessions import SecureCookieSessionInterface
from flask.testing import FlaskClient
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_sqlalchemy import SQLAlchemy
from hypothesis import HealthCheck, given, settings
from werkzeug.exceptions import BadRequest
from werkzeug.test import EnvironBuilder, run_wsgi_app

from flask_tenant_jobs import ConfigurationError, TenantJobs
from flask_tenant_jobs.sessions import TenantSessionInterface

from .data import HOSTS

db = SQLAlchemy()
TENANTS = ["acme", "acme-eu", "globex"]
DOMAIN = "example.test"


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


@dataclass
class Browser:
    """A test client that visits tenants' hosts and keeps one cookie jar, like a browser."""

    app: Flask
    client: FlaskClient

    def get(self, path: str, tenant: str | None, **kwargs: t.Any) -> t.Any:
        host = f"{tenant}.{DOMAIN}" if tenant else DOMAIN
        return self.client.get(path, base_url=f"http://{host}", **kwargs)

    def json(self, path: str, tenant: str | None) -> t.Any:
        response = self.get(path, tenant)
        assert response.status_code == 200, response.data
        return response.json

    def cookies(self) -> dict[str, str]:
        return {cookie.key: cookie.value for cookie in self.client._cookies.values()}


def make_app(**config: t.Any) -> tuple[Flask, TenantJobs]:
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME=DOMAIN,
        SECRET_KEY="test-secret",
        SESSION_COOKIE_DOMAIN=f".{DOMAIN}",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=TENANTS,
    )
    app.config.update(config)
    db.init_app(app)
    tenant_jobs = TenantJobs(app, db=db)
    add_views(app)
    return app, tenant_jobs


def add_views(app: Flask) -> None:
    @app.get("/login/<name>")
    def login(name: str) -> str:
        session["user"] = name
        return "ok"

    @app.get("/me")
    def me() -> dict[str, t.Any]:
        return {"tenant": g.tenant, "user": session.get("user"), "keys": sorted(session)}

    @app.get("/logout")
    def logout() -> str:
        session.clear()
        return "ok"


@pytest.fixture
def browser() -> Browser:
    app, _ = make_app()
    return Browser(app, app.test_client())


def plant(browser: Browser, name: str, value: str) -> None:
    """Put a cookie for every host of the domain in ``browser``'s jar, as a server's would be."""
    browser.client.set_cookie(name, value, domain=DOMAIN, origin_only=False)


def set_cookies(response: t.Any) -> list[str]:
    return [header.split("=", 1)[0] for header in response.headers.getlist("Set-Cookie")]


# -- Flask's cookie sessions --------------------------------------------------------------


def test_a_session_made_on_acme_reads_as_empty_on_globex(browser: Browser) -> None:
    response = browser.get("/login/bob", "acme")
    assert set_cookies(response) == ["session.acme"]
    assert "Domain=example.test" in response.headers["Set-Cookie"]  # sent to every tenant
    assert browser.json("/me", "globex") == {"tenant": "globex", "user": None, "keys": []}
    assert browser.json("/me", "acme-eu")["user"] is None  # acme is a prefix of acme-eu
    assert browser.json("/me", None)["user"] is None  # the apex has a session of its own
    assert browser.json("/me", "acme")["user"] == "bob"


def test_visiting_another_tenant_keeps_the_first_tenants_session(browser: Browser) -> None:
    browser.get("/login/bob", "acme")
    for path in ["/me", "/login/eve", "/me", "/logout"]:
        response = browser.get(path, "globex")
        assert "session.acme" not in set_cookies(response), path
        assert set(set_cookies(response)) <= {"session.globex"}
    browser.get("/login/eve", "globex")
    browser.get("/login/carol", None)
    assert browser.json("/me", "acme")["user"] == "bob"
    assert browser.json("/me", "globex")["user"] == "eve"
    assert browser.json("/me", None)["user"] == "carol"
    browser.get("/logout", "globex")  # deletes globex's cookie only
    assert browser.json("/me", "globex")["user"] is None
    assert browser.json("/me", "acme")["user"] == "bob"
    assert browser.json("/me", None)["user"] == "carol"


def test_a_cookie_replayed_under_another_tenants_name_reads_as_empty(browser: Browser) -> None:
    browser.get("/login/bob", "acme")
    stolen = browser.cookies()["session.acme"]
    for tenant, name in [("globex", "session.globex"), ("acme-eu", "session.acme-eu"),
                         (None, "session")]:
        replay = Browser(browser.app, browser.app.test_client())
        plant(replay, name, stolen)
        assert replay.json("/me", tenant)["user"] is None, name
        plant(replay, "session.acme", stolen)
        assert replay.json("/me", "acme")["user"] == "bob"  # the real owner still reads it


def test_the_apex_session_is_not_read_on_a_tenants_host(browser: Browser) -> None:
    browser.get("/login/admin", None)
    assert browser.json("/me", "acme")["user"] is None
    replay = Browser(browser.app, browser.app.test_client())
    plant(replay, "session.acme", browser.cookies()["session"])
    assert replay.json("/me", "acme")["user"] is None


@pytest.mark.parametrize("value", [
    "", "x", "e30", "e30.AAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAA", "\u00e9" * 50, "." * 3900,
    "eyJ1c2VyIjoiZXZlIn0.aw9ITQ.t4NhooOXqE0RGfIjrMjK5fYZ4Fc",
])
def test_tampered_cookies_read_as_empty(browser: Browser, value: str) -> None:
    plant(browser, "session.acme", value)
    assert browser.json("/me", "acme")["user"] is None


def test_a_signed_cookie_edited_by_hand_reads_as_empty(browser: Browser) -> None:
    browser.get("/login/bob", "acme")
    _, stamp, signature = browser.cookies()["session.acme"].split(".")
    forged = "eyJ1c2VyIjoiYWRtaW4ifQ"  # {"user":"admin"}
    plant(browser, "session.acme", f"{forged}.{stamp}.{signature}")
    assert browser.json("/me", "acme")["user"] is None


@pytest.mark.parametrize("host", ["initech.example.test", "evil.test", "-x.example.test"])
def test_a_request_for_no_known_tenant_reads_and_writes_no_session(
    browser: Browser, host: str
) -> None:
    browser.get("/login/bob", "acme")
    response = browser.client.get("/login/eve", headers={"Host": host})
    assert response.status_code == 404
    assert set_cookies(response) == []
    assert browser.json("/me", "acme")["user"] == "bob"


@pytest.fixture(scope="module")
def signed_in() -> tuple[Flask, str]:
    """An app that trusts only its own hosts and the Cookie header of a browser signed in
    on acme (plus a junk cookie)."""
    app, _ = make_app(TRUSTED_HOSTS=[DOMAIN, f".{DOMAIN}"])
    browser = Browser(app, app.test_client())
    browser.get("/login/bob", "acme")
    return app, f"session.acme={browser.cookies()['session.acme']}; session=junk"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host=HOSTS)
def test_hostile_hosts_never_read_a_session_that_is_not_theirs_nor_answer_500(
    signed_in: tuple[Flask, str], host: str
) -> None:
    app, cookie = signed_in
    builder = EnvironBuilder(path="/me", base_url=f"http://{DOMAIN}")
    environ = builder.get_environ()
    builder.close()
    environ.update(HTTP_HOST=host, HTTP_COOKIE=cookie)
    app_iter, status, headers = run_wsgi_app(app, environ, buffered=True)
    body = b"".join(app_iter)
    code = int(status.split()[0])
    assert code in (200, 400, 404), (host, status, body[:200])
    assert "Set-Cookie" not in headers, (host, headers)
    if code == 200:
        seen = json.loads(body)
        assert seen["user"] == ("bob" if seen["tenant"] == "acme" else None), (host, seen)


def test_a_host_werkzeug_refuses_is_a_400_not_a_500() -> None:
    app, _ = make_app(TRUSTED_HOSTS=[".example.test"])
    client = app.test_client()
    assert client.get("/me", headers={"Host": "acme.example.test"}).status_code == 200
    response = client.get("/me", headers={"Host": "evil.test"})
    assert response.status_code == 400 and set_cookies(response) == []


def test_each_path_tenant_on_one_host_has_its_own_session() -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s", SQLALCHEMY_DATABASE_URI="sqlite://",
                      TENANT_JOBS_TENANTS=TENANTS, TENANT_JOBS_RESOLVER="path")
    db.init_app(app)
    TenantJobs(app, db=db)

    @app.get("/<tenant>/login")
    def login() -> str:
        session["user"] = "bob"
        return "ok"

    @app.get("/<tenant>/me")
    def me() -> dict[str, t.Any]:
        return {"user": session.get("user")}

    client = app.test_client()
    client.get("/acme/login")
    assert client.get("/globex/me").json == {"user": None}
    assert client.get("/acme/me").json == {"user": "bob"}


def test_the_resolver_runs_once_per_request() -> None:
    calls: list[str] = []

    def resolver(request: Request) -> str | None:
        calls.append(request.path)
        return request.headers.get("X-Tenant")

    app, _ = make_app(TENANT_JOBS_RESOLVER=resolver)
    client = app.test_client()
    client.get("/login/bob", headers={"X-Tenant": "acme"})
    assert client.get("/me", headers={"X-Tenant": "globex"}).json["user"] is None
    assert client.get("/me", headers={"X-Tenant": "acme"}).json["user"] == "bob"
    assert calls == ["/login/bob", "/me", "/me"]


def test_a_resolver_that_raises_runs_once_and_answers_as_it_would_without_sessions() -> None:
    calls: list[str] = []

    def resolver(request: Request) -> str | None:
        calls.append(request.path)
        raise BadRequest("no tenant here")

    for shared in (False, True):
        app, _ = make_app(TENANT_JOBS_RESOLVER=resolver, TENANT_JOBS_SHARED_SESSION=shared)
        response = app.test_client().get("/login/bob")
        assert response.status_code == 400 and set_cookies(response) == []
    assert calls == ["/login/bob", "/login/bob"]


def test_shared_session_opts_out() -> None:
    app, _ = make_app(TENANT_JOBS_SHARED_SESSION=True)
    browser = Browser(app, app.test_client())
    assert type(app.session_interface) is SecureCookieSessionInterface
    assert set_cookies(browser.get("/login/bob", "acme")) == ["session"]
    assert browser.json("/me", "globex")["user"] == "bob"  # single sign-on, the app's call


# -- Flask-Login --------------------------------------------------------------------------


def flask_login_browser(**config: t.Any) -> Browser:
    app, _ = make_app(**config)
    login_manager = LoginManager(app)
    login_manager.user_loader(User)

    @app.get("/sign-in/<name>")
    def sign_in(name: str) -> str:
        login_user(User(name), remember=True)
        return "ok"

    @app.get("/whoami")
    def whoami() -> dict[str, t.Any]:
        return {"anonymous": current_user.is_anonymous,
                "id": None if current_user.is_anonymous else current_user.id}

    @app.get("/sign-out")
    def sign_out() -> str:
        logout_user()
        return "ok"

    return Browser(app, app.test_client())


def test_flask_login_user_on_acme_is_anonymous_on_globex() -> None:
    browser = flask_login_browser()
    browser.get("/sign-in/bob", "acme")
    assert browser.json("/whoami", "acme") == {"anonymous": False, "id": "bob"}
    assert browser.json("/whoami", "globex") == {"anonymous": True, "id": None}
    assert browser.json("/whoami", "acme-eu")["anonymous"]
    browser.get("/sign-in/eve", "globex")
    browser.get("/sign-out", "globex")
    assert browser.json("/whoami", "globex")["anonymous"]
    assert browser.json("/whoami", "acme") == {"anonymous": False, "id": "bob"}


def test_flask_login_remember_cookie_stays_on_its_host_by_default() -> None:
    browser = flask_login_browser()
    browser.get("/sign-in/bob", "acme")
    browser.client.delete_cookie("session.acme", domain=f".{DOMAIN}")
    assert browser.json("/whoami", "globex")["anonymous"]
    assert browser.json("/whoami", "acme") == {"anonymous": False, "id": "bob"}  # remembered


# -- custom session interfaces ------------------------------------------------------------


class SaltedSessions(SecureCookieSessionInterface):
    salt = "my-salt"


class BoundSaltedSessions(TenantSessionInterface, SaltedSessions):
    pass


def test_a_custom_cookie_interface_keeps_working_when_it_derives_from_ours() -> None:
    app = Flask(__name__)
    app.session_interface = BoundSaltedSessions()
    app.config.update(SERVER_NAME=DOMAIN, SECRET_KEY="s", SESSION_COOKIE_DOMAIN=f".{DOMAIN}",
                      SQLALCHEMY_DATABASE_URI="sqlite://", TENANT_JOBS_TENANTS=TENANTS)
    db.init_app(app)
    TenantJobs(app, db=db)
    add_views(app)
    browser = Browser(app, app.test_client())
    browser.get("/login/bob", "acme")
    assert browser.json("/me", "globex")["user"] is None
    assert browser.json("/me", "acme")["user"] == "bob"
    with app.test_request_context(base_url=f"http://acme.{DOMAIN}"):
        serializer = app.session_interface.get_signing_serializer(app)
        assert serializer is not None and serializer.salt == b"my-salt|tenant:acme"
        assert serializer.loads(browser.cookies()["session.acme"]) == {"user": "bob"}


@pytest.mark.parametrize("interface", [SaltedSessions(), t.cast(t.Any, object())])
def test_an_interface_that_cannot_be_bound_is_refused_at_init(interface: t.Any) -> None:
    app = Flask(__name__)
    app.session_interface = interface
    app.config.update(SERVER_NAME=DOMAIN, SQLALCHEMY_DATABASE_URI="sqlite://",
                      TENANT_JOBS_TENANTS=TENANTS)
    db.init_app(app)
    with pytest.raises(ConfigurationError) as raised:
        TenantJobs(app, db=db)
    assert "TENANT_JOBS_SHARED_SESSION" in str(raised.value)
    assert type(interface).__name__ in str(raised.value)
    app.config["TENANT_JOBS_SHARED_SESSION"] = True
    TenantJobs(app, db=db)
    assert app.session_interface is interface


def test_an_interface_replaced_after_init_app_is_refused_at_the_first_request() -> None:
    app, _ = make_app(PROPAGATE_EXCEPTIONS=True)
    app.session_interface = SaltedSessions()
    client = app.test_client()
    for _ in range(2):  # and on every request after, until it is fixed
        with pytest.raises(ConfigurationError, match="SaltedSessions"):
            client.get("/me", base_url=f"http://acme.{DOMAIN}")


def test_the_first_request_check_runs_once() -> None:
    app, _ = make_app()
    client = app.test_client()
    hooks = len(app.before_request_funcs[None])
    client.get("/me", base_url=f"http://acme.{DOMAIN}")
    assert len(app.before_request_funcs[None]) == hooks - 1


def test_our_interface_on_an_app_without_tenant_jobs_says_so() -> None:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "s"
    app.session_interface = TenantSessionInterface()
    app.config["PROPAGATE_EXCEPTIONS"] = True

    @app.get("/")
    def index() -> str:
        return "ok"

    with pytest.raises(ConfigurationError, match="init_app"):
        app.test_client().get("/")


# -- the pytest plugin --------------------------------------------------------------------


@pytest.fixture
def app() -> Flask:
    """pytest-flask's app, for the plugin's ``tenant_client``."""
    return make_app()[0]


def test_tenant_client_session_transaction_sets_the_tenants_session(
    tenant_client: t.Callable[[str], FlaskClient],
) -> None:
    acme, globex = tenant_client("acme"), tenant_client("globex")
    with acme.session_transaction() as acme_session:
        acme_session["user"] = "bob"
    assert acme.get("/me").json["user"] == "bob"
    assert globex.get("/me").json["user"] is None
    with acme.session_transaction() as acme_session:
        assert acme_session["user"] == "bob"


def test_the_tenant_interface_on_an_app_without_the_extension_says_how_to_set_it_up() -> None:
    app = Flask("plain")
    app.config.update(SECRET_KEY="test-secret", PROPAGATE_EXCEPTIONS=True)
    app.session_interface = TenantSessionInterface()
    app.get("/")(lambda: "ok")
    with pytest.raises(ConfigurationError, match=r"TenantJobs is not set up on app 'plain'"):
        app.test_client().get("/")


def test_the_tenant_interface_with_shared_sessions_names_the_setting() -> None:
    app, _ = make_app(TENANT_JOBS_SHARED_SESSION=True, PROPAGATE_EXCEPTIONS=True)
    app.session_interface = TenantSessionInterface()
    with pytest.raises(ConfigurationError, match=r"'TENANT_JOBS_SHARED_SESSION' is True"):
        app.test_client().get("/me", base_url=f"http://acme.{DOMAIN}")
