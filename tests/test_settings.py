"""Every ``TENANT_JOBS_*`` key is checked at ``init_app``: unknown keys name the closest known
one, wrong types and ranges name the key and what it accepts, and the docs list every key."""

from __future__ import annotations

import re
import typing as t
from pathlib import Path

import pytest
from celery import Celery
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import ConfigurationError, TenantJobs, tenant_task
from flask_tenant_jobs.settings import known_keys

ROOT = Path(__file__).resolve().parent.parent


def init(**config: t.Any) -> TenantJobs:
    """``TenantJobs`` on a fresh app with a valid base configuration plus ``config``."""
    return t.cast(TenantJobs, init_app(**config).extensions["tenant_jobs"])


def init_app(**config: t.Any) -> Flask:
    """A fresh app with ``TenantJobs``, a valid base configuration plus ``config``."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite://", SERVER_NAME="example.test", TENANT_JOBS_TENANTS=["a"]
    )
    app.config.update(config)
    TenantJobs(app, db=SQLAlchemy(app))
    return app


def refused(**config: t.Any) -> str:
    """The message of the ``ConfigurationError`` that ``config`` causes at ``init_app``."""
    with pytest.raises(ConfigurationError) as raised:
        init(**config)
    assert raised.value.tenant is None
    return str(raised.value)


@pytest.mark.parametrize(
    ("key", "closest"),
    [
        ("TENANT_JOBS_STRATEGIE", "TENANT_JOBS_STRATEGY"),
        ("TENANT_JOBS_TENANT", "TENANT_JOBS_TENANTS"),
        ("TENANT_JOBS_CACHE_SECOND", "TENANT_JOBS_CACHE_SECONDS"),
        ("TENANT_JOBS_EXCLUDE_PATHS", "TENANT_JOBS_EXCLUDED_PATHS"),
        ("TENANT_JOBS_REQUIRE", "TENANT_JOBS_REQUIRE_TENANT"),
        ("TENANT_JOBS_SHEMA_FORMAT", "TENANT_JOBS_SCHEMA_FORMAT"),
    ],
)
def test_an_unknown_key_names_the_closest_known_key(key: str, closest: str) -> None:
    message = refused(**{key: "schema"})
    assert message.startswith(f"Unknown setting '{key}': did you mean '{closest}'?")
    assert "docs/configuration.md" in message


def test_an_unknown_key_far_from_every_known_key_still_gets_a_suggestion() -> None:
    message = refused(TENANT_JOBS_XYZZY=True)
    assert re.search(r"did you mean 'TENANT_JOBS_[A-Z_]+'\?", message), message


def test_keys_without_the_prefix_are_not_ours() -> None:
    tenant_jobs = init(TENANT_JOBSX=1, MY_TENANT_JOBS_STRATEGY="x", CELERY_TENANT_JOBS=1)
    assert tenant_jobs.db is not None


WRONG_VALUES: list[tuple[str, t.Any, str]] = [
    ("TENANT_JOBS_CACHE_SECONDS", "sixty", "use a number of seconds, 0 or more (e.g. 60)"),
    ("TENANT_JOBS_CACHE_SECONDS", "60", "use a number of seconds"),
    ("TENANT_JOBS_CACHE_SECONDS", -1, "use a number of seconds, 0 or more"),
    ("TENANT_JOBS_CACHE_SECONDS", float("nan"), "use a number of seconds"),
    ("TENANT_JOBS_CACHE_SECONDS", True, "use a number of seconds"),
    ("TENANT_JOBS_EXCLUDED_SUBDOMAINS", "admin", "use a list of strings, e.g. ['www', 'admin']"),
    ("TENANT_JOBS_EXCLUDED_SUBDOMAINS", ["www", 3], "use a list of strings only"),
    ("TENANT_JOBS_EXCLUDED_PATHS", "/health", "use a list of strings"),
    ("TENANT_JOBS_EXCLUDED_PATHS", ["health"], "paths that start with '/'"),
    ("TENANT_JOBS_REQUIRE_TENANT", "false", "use True or False"),
    ("TENANT_JOBS_REQUIRE_TENANT", 0, "use True or False"),
    ("TENANT_JOBS_STRATEGY", "rows", "use one of 'column', 'schema'"),
    ("TENANT_JOBS_STRATEGY", ["column"], "use one of 'column', 'schema'"),
    ("TENANT_JOBS_RESOLVER", "cookie", "use one of 'subdomain', 'domain', 'header', 'path'"),
    ("TENANT_JOBS_TENANTS", "acme", "use a list of tenant names, or a zero-argument callable"),
    ("TENANT_JOBS_TENANTS", 42, "use a list of tenant names"),
    ("TENANT_JOBS_HEADER", "", "use a non-empty string"),
    ("TENANT_JOBS_HEADER", b"tenant", "use a non-empty string"),
    ("TENANT_JOBS_REQUEST_HEADER", 7, "use a non-empty string"),
    ("TENANT_JOBS_SHARED_SCHEMA", "", "use a non-empty string"),
    ("TENANT_JOBS_SCHEMA_FORMAT", "t_", "use a string containing '{tenant}'"),
    ("TENANT_JOBS_SCHEMA_FORMAT", "t_{tenant}_{region}", "and no other '{...}'"),
    ("TENANT_JOBS_SCHEMA_FORMAT", "t_{tenant}_{", "and no other '{...}'"),
    ("TENANT_JOBS_DOMAINS", ["shop.acme.com"], "use a dict of host to tenant name"),
    ("TENANT_JOBS_DOMAINS", {"shop.acme.com": 1}, "use a dict of host to tenant name"),
    ("TENANT_JOBS_BASE_DOMAIN", "", "use a domain name such as 'example.test'"),
    ("TENANT_JOBS_BASE_DOMAIN", 42, "use a domain name"),
]


@pytest.mark.parametrize(("key", "value", "accepted"), WRONG_VALUES)
def test_a_wrong_value_names_the_key_and_what_it_accepts(
    key: str, value: t.Any, accepted: str
) -> None:
    message = refused(**{key: value})
    assert message.startswith(f"'{key}' is {value!r}: "), message
    assert accepted in message, message


def test_a_long_value_is_shortened_in_the_message() -> None:
    message = refused(TENANT_JOBS_STRATEGY="x" * 500)
    assert len(message) < 200 and "..." in message


def test_the_accepted_forms_are_read() -> None:
    app = init_app(
        TENANT_JOBS_TENANTS=("acme", "globex"),
        TENANT_JOBS_EXCLUDED_SUBDOMAINS={"WWW", "Admin"},
        TENANT_JOBS_EXCLUDED_PATHS=("/static", "/health"),
        TENANT_JOBS_CACHE_SECONDS=5,
        TENANT_JOBS_BASE_DOMAIN="Shop.Example.TEST:8000",
        TENANT_JOBS_DOMAINS={"shop.acme.com": "acme"},
        TENANT_JOBS_REQUIRE_TENANT=False,
    )
    tenant_jobs = app.extensions["tenant_jobs"]
    with app.app_context():
        settings = tenant_jobs.settings
        assert tenant_jobs.tenant_names() == ["acme", "globex"]
    assert settings.excluded_subdomains == frozenset({"www", "admin"})
    assert settings.excluded_paths == ("/static", "/health")
    assert settings.cache_seconds == 5.0 and isinstance(settings.cache_seconds, float)
    assert settings.base_domain == "shop.example.test"
    assert settings.require_tenant is False


def test_a_key_set_to_none_takes_its_default() -> None:
    app = init_app(TENANT_JOBS_STRATEGY=None, TENANT_JOBS_BASE_DOMAIN=None)
    tenant_jobs = app.extensions["tenant_jobs"]
    with app.app_context():
        assert tenant_jobs.settings.strategy == "column"
        assert tenant_jobs.settings.base_domain == "example.test"  # from SERVER_NAME


def test_callables_are_accepted_where_documented() -> None:
    app = init_app(
        TENANT_JOBS_TENANTS=lambda: ["acme"],
        TENANT_JOBS_RESOLVER=lambda request: None,
        TENANT_JOBS_DOMAINS=lambda host: None,
    )
    tenant_jobs = app.extensions["tenant_jobs"]
    with app.app_context():
        assert tenant_jobs.tenant_names() == ["acme"]


def test_the_configuration_page_documents_every_key_and_no_other() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = {key for key in re.findall(r"^\| `(TENANT_JOBS_[A-Z_]+)` \|", page, re.MULTILINE)}
    sections = set(re.findall(r"^## `(TENANT_JOBS_[A-Z_]+)`$", page, re.MULTILINE))
    assert table == set(known_keys())
    assert sections == set(known_keys())


@tenant_task
def ship_parcel(parcel_id: int) -> None:
    """A tenant task of an app without ``CELERY``."""


def test_a_tenant_task_of_an_app_without_celery_is_refused_not_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without ``app.config["CELERY"]`` a tenant task would go to Celery's default app, which
    publishes to a broker on localhost; it is refused before anything is published."""
    published: list[t.Any] = []
    monkeypatch.setattr(Celery, "send_task", lambda self, *a, **k: published.append(a))
    app = init_app(TENANT_JOBS_TENANTS=["acme"])
    tenant_jobs = app.extensions["tenant_jobs"]
    with app.app_context(), tenant_jobs.switch("acme"):
        for send in (
            lambda: ship_parcel.delay(1),
            lambda: ship_parcel.apply_async((1,), countdown=5),
            lambda: ship_parcel.s(1).apply_async(),
            lambda: ship_parcel.apply((1,)),
        ):
            with pytest.raises(ConfigurationError) as raised:
                send()
            assert "has no Celery app to go through: set app.config['CELERY']" in str(
                raised.value
            )
    assert published == []
