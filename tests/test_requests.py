"""Requests: the resolvers, ``g.tenant``, 404 for unknown or malformed tenants without
SQL, excluded paths, clean-up after the request, and the signals."""

from __future__ import annotations

import typing as t
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask, Request, g, url_for
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Mapped, mapped_column
from werkzeug.test import EnvironBuilder, run_wsgi_app

from flask_tenant_jobs import ConfigurationError, TenantJobs, TenantScoped, current_tenant
from flask_tenant_jobs.context import is_unscoped
from flask_tenant_jobs.signals import tenant_not_found, tenant_resolved, tenant_switched

from .core_app import StatementCounter, make_app, tables
from .data import MALFORMED_NAMES, tenant_table

db = SQLAlchemy()


TenantRow = tenant_table(db, "req_tenant")


class Ticket(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "req_ticket"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(40))


def tenants_from_table() -> list[str]:
    return list(db.session.scalars(sa.select(TenantRow.name)))


BAD_HOSTS = [
    "UMBRELLA.example.test",
    "umbrella.example.test",
    "acme-.example.test",
    "-acme.example.test",
    "x'--.example.test",
    "acme;drop.example.test",
    "a" * 70 + ".example.test",
    "xn--bcher-kva.example.test",
    "bücher.example.test",
    "",
    "a..example.test",
    ".example.test",
    "acme..example.test",
    "acme.globex.example.test",
    "acme example.test",
    "acme%2e.example.test",
    "evil.test",
    "acme.example.test.evil.test",
    "acme.example.testx",
    "[::1]:80",
    "127.0.0.1",
    "acme.example.test:notaport",
]

WELL_FORMED_UNKNOWN_HOSTS = {
    "UMBRELLA.example.test",
    "umbrella.example.test",
    "xn--bcher-kva.example.test",
}


def views(app: Flask, calls: list[str]) -> None:
    """The routes every test app has; ``calls`` records which views ran."""

    @app.route("/tickets")
    def tickets() -> dict[str, t.Any]:
        calls.append("tickets")
        titles = sorted(db.session.scalars(sa.select(Ticket.title)))
        return {"tenant": g.tenant, "current": current_tenant(), "titles": titles}

    @app.route("/whoami")
    def whoami() -> dict[str, t.Any]:
        calls.append("whoami")
        return {"tenant": g.tenant, "current": current_tenant()}

    @app.route("/health")
    def health() -> dict[str, t.Any]:
        calls.append("health")
        return {"tenant": g.tenant, "current": current_tenant()}

    @app.route("/boom")
    def boom() -> str:
        calls.append("boom")
        raise RuntimeError(f"boom in {current_tenant()}")


@dataclass
class Site:
    """A test app with seeded tickets (acme: anvil, globex: hammock) and a SQL counter."""

    app: Flask
    tenant_jobs: TenantJobs
    client: FlaskClient
    sql: StatementCounter
    calls: list[str]

    def get(self, url: str, **kwargs: t.Any) -> t.Any:
        self.sql.clear()
        return self.client.get(url, **kwargs)


@pytest.fixture
def make_site(tmp_path: Path) -> t.Iterator[t.Callable[..., Site]]:
    """Build a ``Site`` with the given settings (SQLite, tenants read from a table)."""
    with ExitStack() as cleanups:

        def build(database_url: str | None = None, **config: t.Any) -> Site:
            config.setdefault("TENANT_JOBS_TENANTS", tenants_from_table)
            app, tenant_jobs = make_app(
                db, database_url or f"sqlite:///{tmp_path / 'site.db'}", **config
            )
            calls: list[str] = []
            views(app, calls)
            cleanups.enter_context(tables(app, db))
            with app.app_context():
                db.session.add_all([TenantRow(name=name) for name in ("acme", "globex", "initech")])
                db.session.commit()
                with tenant_jobs.switch("acme"):
                    db.session.add(Ticket(title="anvil"))
                    db.session.commit()
                with tenant_jobs.switch("globex"):
                    db.session.add(Ticket(title="hammock"))
                    db.session.commit()
                sql = StatementCounter(db.engine)
            cleanups.callback(sql.detach)
            return Site(app, tenant_jobs, app.test_client(), sql, calls)

        yield build


@pytest.fixture
def site(make_site: t.Callable[..., Site]) -> Site:
    return make_site()


def assert_no_tenant_left() -> None:
    assert current_tenant() is None


# -- subdomain resolver -----------------------------------------------------------------


def test_subdomain_resolves_the_tenant(make_site: t.Callable[..., Site], database_url: str) -> None:
    site = make_site(database_url)
    response = site.get("http://acme.example.test/tickets")
    assert response.status_code == 200
    assert response.json == {"tenant": "acme", "current": "acme", "titles": ["anvil"]}
    response = site.get("http://globex.example.test/tickets")
    assert response.json == {"tenant": "globex", "current": "globex", "titles": ["hammock"]}
    assert_no_tenant_left()


@pytest.mark.parametrize(
    "host",
    ["ACME.example.test", "Acme.Example.Test", "acme.example.test:8080", "acme.example.test."],
)
def test_host_matching_is_case_insensitive_and_ignores_the_port(site: Site, host: str) -> None:
    response = site.get("/whoami", headers={"Host": host})
    assert response.status_code == 200
    assert response.json == {"tenant": "acme", "current": "acme"}


def test_hosts_resolve_the_same_however_many_hosts_came_before(site: Site) -> None:
    """Each host's label is worked out once and kept, for a bounded number of hosts: a
    flood of other hosts (well-formed or overlong) changes no answer and keeps no more."""
    assert site.get("/whoami", headers={"Host": "acme.example.test"}).json["tenant"] == "acme"
    for i in range(5_000):
        assert site.get("/whoami", headers={"Host": f"t{i}.example.test"}).status_code == 404
    overlong = "a" * 300 + ".example.test"
    assert site.get("/whoami", headers={"Host": overlong}).status_code == 404
    assert site.get("/whoami", headers={"Host": "ACME.example.test"}).json["tenant"] == "acme"
    assert site.get("/whoami", headers={"Host": "www.example.test"}).json["tenant"] is None
    resolver = site.app.extensions["tenant_jobs"]._states[site.app].resolver
    assert resolver._kept_label_of.cache_info().currsize <= 4096
    assert_no_tenant_left()


def test_the_base_domain_has_no_tenant(site: Site) -> None:
    response = site.get("http://example.test/whoami")
    assert response.status_code == 200
    assert response.json == {"tenant": None, "current": None}


@pytest.mark.parametrize(
    "url", ["http://www.example.test/whoami", "http://WWW.example.test/whoami"]
)
def test_www_is_excluded_by_default(site: Site, url: str) -> None:
    assert site.get(url).json == {"tenant": None, "current": None}


def test_excluded_subdomains_are_configurable(make_site: t.Callable[..., Site]) -> None:
    site = make_site(TENANT_JOBS_EXCLUDED_SUBDOMAINS=["admin"])
    assert site.get("http://admin.example.test/whoami").json == {"tenant": None, "current": None}
    assert site.get("http://www.example.test/whoami").status_code == 404


def test_a_base_domain_setting_without_server_name(make_site: t.Callable[..., Site]) -> None:
    site = make_site(SERVER_NAME=None, TENANT_JOBS_BASE_DOMAIN="shop.test")
    assert site.get("/whoami", headers={"Host": "globex.shop.test"}).json == {
        "tenant": "globex",
        "current": "globex",
    }
    assert site.get("/whoami", headers={"Host": "shop.test"}).json["tenant"] is None
    assert site.get("/whoami", headers={"Host": "globex.example.test"}).status_code == 404


def test_a_request_without_tenant_on_scoped_data_is_404(site: Site) -> None:
    response = site.get("http://example.test/tickets")
    assert response.status_code == 404
    assert site.sql.count == 0


def test_a_request_without_tenant_on_scoped_data_is_404_when_propagating(site: Site) -> None:
    site.app.config["PROPAGATE_EXCEPTIONS"] = True
    assert site.get("http://example.test/tickets").status_code == 404


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_bad_hosts_are_404_without_sql(site: Site, host: str) -> None:
    site.get("http://acme.example.test/whoami")  # the tenant cache is warm
    site.calls.clear()
    response = site.get("/tickets", headers={"Host": host})
    assert response.status_code in (400, 404)
    assert site.sql.statements == []
    assert site.calls == []
    assert_no_tenant_left()


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_bad_hosts_never_read_the_tenant_source(site: Site, host: str) -> None:
    with site.app.app_context():
        site.tenant_jobs.refresh()  # a cold cache
    response = site.get("/tickets", headers={"Host": host})
    assert response.status_code in (400, 404)
    if host in WELL_FORMED_UNKNOWN_HOSTS:  # a well-formed name is looked up, once
        assert len(site.sql.statements) == 1
        assert "req_tenant" in site.sql.statements[0]
    else:
        assert site.sql.statements == []


def test_a_request_without_a_host_header_is_404(site: Site) -> None:
    environ = EnvironBuilder(path="/tickets").get_environ()
    del environ["HTTP_HOST"]  # the host comes from SERVER_NAME ("localhost") instead
    site.sql.clear()
    body, status, _ = run_wsgi_app(site.app, environ)
    assert b"No such tenant." in b"".join(body)
    assert status.startswith("404")
    assert site.sql.count == 0
    assert site.calls == []


# -- domain, header, path and callable resolvers ----------------------------------------


def test_domain_resolver_maps_full_hosts(make_site: t.Callable[..., Site]) -> None:
    site = make_site(
        TENANT_JOBS_RESOLVER="domain",
        TENANT_JOBS_DOMAINS={"shop.acme.test": "acme", "GLOBEX.TEST": "globex", "x.test": "nope"},
    )
    assert site.get("http://shop.acme.test/whoami").json["tenant"] == "acme"
    assert site.get("http://SHOP.ACME.TEST/whoami").json["tenant"] == "acme"
    assert site.get("http://globex.test/whoami").json["tenant"] == "globex"
    assert site.get("http://example.test/whoami").json["tenant"] is None
    for url in ("http://acme.example.test/whoami", "http://x.test/whoami", "http://evil.test/"):
        assert site.get(url).status_code == 404
        assert site.sql.statements == []


def test_domain_resolver_accepts_a_callable(make_site: t.Callable[..., Site]) -> None:
    site = make_site(
        TENANT_JOBS_RESOLVER="domain",
        TENANT_JOBS_DOMAINS=lambda host: host.split(".")[0] if host.endswith(".shop") else None,
    )
    assert site.get("http://initech.shop/whoami").json["tenant"] == "initech"
    assert site.get("http://initech.other/whoami").status_code == 404


def test_header_resolver(make_site: t.Callable[..., Site]) -> None:
    site = make_site(TENANT_JOBS_RESOLVER="header")
    response = site.get("/tickets", headers={"X-Tenant": "globex"})
    assert response.json == {"tenant": "globex", "current": "globex", "titles": ["hammock"]}
    assert site.get("/whoami").json == {"tenant": None, "current": None}
    assert site.get("/tickets").status_code == 404


def test_header_resolver_header_name_is_configurable(make_site: t.Callable[..., Site]) -> None:
    site = make_site(TENANT_JOBS_RESOLVER="header", TENANT_JOBS_REQUEST_HEADER="X-Org")
    assert site.get("/whoami", headers={"X-Org": "acme"}).json["tenant"] == "acme"
    assert site.get("/whoami", headers={"X-Tenant": "acme"}).json["tenant"] is None


@pytest.mark.parametrize(
    "name", [n for n in MALFORMED_NAMES if isinstance(n, str)] + ["umbrella"], ids=repr
)
def test_header_resolver_bad_names_are_404_without_sql(
    make_site: t.Callable[..., Site], name: str
) -> None:
    site = make_site(TENANT_JOBS_RESOLVER="header")
    site.get("/whoami", headers={"X-Tenant": "acme"})  # the tenant cache is warm
    site.calls.clear()
    response = site.get("/tickets", headers={"X-Tenant": name})
    assert response.status_code == 404
    assert site.sql.statements == []
    assert site.calls == []


def test_path_resolver(make_site: t.Callable[..., Site]) -> None:
    site = make_site(TENANT_JOBS_RESOLVER="path", SERVER_NAME=None)

    @site.app.route("/")
    def index() -> dict[str, t.Any]:
        return {"tenant": g.tenant}

    @site.app.route("/<tenant>/orders")
    def orders() -> dict[str, t.Any]:  # no ``tenant`` argument: it was popped
        return {"tenant": g.tenant, "current": current_tenant(), "url": url_for("orders")}

    response = site.get("/acme/orders")
    assert response.status_code == 200
    assert response.json == {"tenant": "acme", "current": "acme", "url": "/acme/orders"}
    assert site.get("/").json == {"tenant": None}
    for path in ("/umbrella/orders", "/ACME/orders", "/acme%20x/orders", "/whoami"):
        assert site.get(path).status_code == 404
        assert site.sql.statements == []


def test_a_callable_resolver(make_site: t.Callable[..., Site]) -> None:
    def from_query(request: Request) -> str | None:
        return request.args.get("t")

    site = make_site(TENANT_JOBS_RESOLVER=from_query)
    assert site.get("/whoami?t=initech").json["tenant"] == "initech"
    assert site.get("/whoami").json["tenant"] is None
    assert site.get("/whoami?t=Initech").status_code == 404
    assert site.get("/whoami?t=umbrella").status_code == 404


ADDRESSABLE = {
    "subdomain": {},
    "domain": {"TENANT_JOBS_DOMAINS": {"shop.acme.test": "acme", "globex.test": "globex"}},
    "header": {"TENANT_JOBS_REQUEST_HEADER": "X-Org"},
    "path": {"SERVER_NAME": None},
}


@pytest.mark.parametrize("resolver", ADDRESSABLE)
def test_a_request_sent_to_a_resolvers_address_resolves_to_that_tenant(
    make_site: t.Callable[..., Site], resolver: str
) -> None:
    site = make_site(TENANT_JOBS_RESOLVER=resolver, **ADDRESSABLE[resolver])
    site.app.add_url_rule("/<tenant>/tickets", view_func=site.app.view_functions["tickets"])
    for tenant, titles in (("acme", ["anvil"]), ("globex", ["hammock"])):
        with site.app.app_context():
            address = site.tenant_jobs.resolver.address(tenant)
        response = site.get(
            address.path_prefix + "/tickets",
            base_url=address.base_url or "http://localhost/",
            headers=dict(address.headers),
        )
        assert response.json == {"tenant": tenant, "current": tenant, "titles": titles}


@pytest.mark.parametrize(
    "config",
    [
        {"TENANT_JOBS_RESOLVER": lambda request: request.args.get("t")},
        {"TENANT_JOBS_RESOLVER": "domain", "TENANT_JOBS_DOMAINS": lambda host: None},
        {"TENANT_JOBS_RESOLVER": "domain", "TENANT_JOBS_DOMAINS": {"shop.acme.test": "acme"}},
    ],
    ids=["callable", "callable-domains", "unmapped-domain"],
)
def test_a_resolver_that_cannot_address_a_tenant_says_so(
    make_site: t.Callable[..., Site], config: dict[str, t.Any]
) -> None:
    site = make_site(**config)
    with site.app.app_context(), pytest.raises(ConfigurationError, match="cannot address tenant"):
        site.tenant_jobs.resolver.address("globex")


# -- excluded paths, g.tenant, clean-up -------------------------------------------------


def test_excluded_paths_skip_resolution(make_site: t.Callable[..., Site]) -> None:
    seen: list[str] = []

    def resolver(request: Request) -> str | None:
        seen.append(request.path)
        return "umbrella"  # would be a 404

    site = make_site(TENANT_JOBS_RESOLVER=resolver, TENANT_JOBS_EXCLUDED_PATHS=["/health"])
    assert site.get("/health").json == {"tenant": None, "current": None}
    assert site.get("/whoami").status_code == 404
    assert seen == ["/whoami"]


def test_the_static_path_is_excluded_by_default(make_site: t.Callable[..., Site]) -> None:
    seen: list[str] = []

    def resolver(request: Request) -> str | None:
        seen.append(request.path)
        return None

    site = make_site(TENANT_JOBS_RESOLVER=resolver)
    site.get("/static/app.css")
    site.get("/static")
    site.get("/staticfiles")
    assert seen == ["/staticfiles"]


def test_g_tenant_is_set_before_other_before_request_hooks(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'hooks.db'}",
        SERVER_NAME="example.test",
        TENANT_JOBS_TENANTS=["acme"],
    )
    seen: list[tuple[str | None, str | None]] = []

    @app.before_request
    def registered_first() -> None:
        seen.append((g.tenant, current_tenant()))

    @app.route("/")
    def index() -> str:
        return "ok"

    TenantJobs(app, db=SQLAlchemy(app))
    assert app.test_client().get("http://acme.example.test/").status_code == 200
    assert seen == [("acme", "acme")]


@pytest.mark.parametrize("propagate", [False, True])
def test_the_tenant_is_cleared_after_a_failing_view(site: Site, propagate: bool) -> None:
    site.app.config["PROPAGATE_EXCEPTIONS"] = propagate
    if propagate:
        with pytest.raises(RuntimeError, match="boom in acme"):
            site.get("http://acme.example.test/boom")
    else:
        assert site.get("http://acme.example.test/boom").status_code == 500
    assert_no_tenant_left()
    assert site.get("http://example.test/whoami").json == {"tenant": None, "current": None}


def test_a_request_restores_the_callers_tenant(site: Site) -> None:
    with site.tenant_jobs.switch("globex"):
        assert site.get("http://acme.example.test/whoami").json["current"] == "acme"
        assert current_tenant() == "globex"
        assert site.get("http://example.test/whoami").json == {"tenant": None, "current": None}
        assert current_tenant() == "globex"


#: ``without_tenant()`` blocks a view left open on purpose (an ExitStack never closed).
LEFT_OPEN: list[ExitStack] = []


@pytest.mark.parametrize("propagate", [False, True])
def test_a_without_tenant_block_left_open_ends_with_its_request(
    site: Site, propagate: bool
) -> None:
    """Regression: the unscoped flag outlived the request, so every later request (and
    task) on the thread read every tenant's rows."""

    @site.app.route("/leave-unscoped")
    def leave_unscoped() -> str:
        stack = ExitStack()
        stack.enter_context(site.tenant_jobs.without_tenant())
        LEFT_OPEN.append(stack)
        raise RuntimeError("the view failed before closing its stack")

    site.app.config["PROPAGATE_EXCEPTIONS"] = propagate
    if propagate:
        with pytest.raises(RuntimeError):
            site.get("http://acme.example.test/leave-unscoped")
    else:
        assert site.get("http://acme.example.test/leave-unscoped").status_code == 500
    assert not is_unscoped()
    assert site.get("http://globex.example.test/tickets").json["titles"] == ["hammock"]


def test_a_request_starts_scoped_inside_without_tenant(site: Site) -> None:
    with site.tenant_jobs.without_tenant():
        assert site.get("http://globex.example.test/tickets").json["titles"] == ["hammock"]
        assert is_unscoped()  # the caller's block is back when the request ends


# -- signals ----------------------------------------------------------------------------


def test_signals(site: Site) -> None:
    sent: list[tuple[str, object, dict[str, t.Any]]] = []

    def recorder(name: str) -> t.Callable[..., None]:
        def receive(sender: object, **kwargs: t.Any) -> None:
            sent.append((name, sender, kwargs))

        return receive

    receivers = {name: recorder(name) for name in ("resolved", "not_found", "switched")}
    app = site.app
    with (
        tenant_resolved.connected_to(receivers["resolved"], app),
        tenant_not_found.connected_to(receivers["not_found"], app),
        tenant_switched.connected_to(receivers["switched"], app),
    ):
        site.get("http://acme.example.test/whoami")
        site.get("http://umbrella.example.test/whoami")
        site.get("http://acme-.example.test/whoami")
        site.get("http://example.test/whoami")
    assert sent == [
        ("switched", app, {"tenant": "acme", "previous": None}),
        ("resolved", app, {"tenant": "acme"}),
        ("not_found", app, {"tenant": "umbrella", "source": "request"}),
        ("not_found", app, {"tenant": "acme-", "source": "request"}),
    ]


# -- fuzzing ----------------------------------------------------------------------------

HOST_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
    max_size=80,
)
HOSTS = st.one_of(
    HOST_TEXT,
    HOST_TEXT.map(lambda label: f"{label}.example.test"),
    st.sampled_from(["acme", "ACME", "globex", "umbrella", "www", ""]).map(
        lambda label: f"{label}.example.test"
    ),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(host=HOSTS)
def test_fuzzed_hosts_never_500_and_never_sql(site: Site, host: str) -> None:
    site.get("http://acme.example.test/whoami")  # the tenant cache is warm
    site.calls.clear()
    response = site.get("/tickets", headers={"Host": host})
    assert response.status_code in (200, 400, 404)
    if response.status_code == 200:
        assert response.json["tenant"] in ("acme", "globex", "initech")
        assert site.calls == ["tickets"]
        assert len(site.sql.statements) == 1  # the view's own query
    else:  # the view may run for hosts without a tenant (www), but reaches no data
        assert site.sql.statements == []
    assert_no_tenant_left()


@pytest.fixture
def header_site(make_site: t.Callable[..., Site]) -> Site:
    site = make_site(TENANT_JOBS_RESOLVER="header")
    site.get("/whoami", headers={"X-Tenant": "acme"})  # the tenant cache is warm
    return site


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=HOST_TEXT)
def test_fuzzed_tenant_headers_never_500_and_never_sql(header_site: Site, name: str) -> None:
    response = header_site.get("/whoami", headers={"X-Tenant": name})
    if name in ("acme", "globex", "initech"):
        assert response.json == {"tenant": name, "current": name}
    elif name == "":
        assert response.status_code == 404
    else:
        assert response.status_code == 404, name
    assert header_site.sql.statements == []
    assert_no_tenant_left()
