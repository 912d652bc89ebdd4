"""Shared fixtures: the real services and two small apps (SQLite and PostgreSQL).

Service URLs come from the environment (``TEST_POSTGRES_URL``, ``TEST_REDIS_URL``,
``TEST_RABBITMQ_URL``). A test that needs an unreachable service is skipped
with the reason, unless ``TENANT_JOBS_DEMAND_SERVICES=1`` (set by ``.ci/run``),
which turns the skip into a failure.
"""

from __future__ import annotations

import os
import socket
import typing as t
from urllib.parse import urlsplit

import pytest

from bench.rls_role import app_role

from .core_app import RLS_SUITE
from .data import POSTGRES_URL, RABBITMQ_URL, REDIS_URL

pytest_plugins = ["pytester"]
collect_ignore = ["plugin_project"]

DEMANDED = os.environ.get("TENANT_JOBS_DEMAND_SERVICES") == "1"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        address = (parts.hostname or "127.0.0.1", parts.port or default_port)
        with socket.create_connection(address, 2):
            return True
    except OSError:
        return False


def require_service(name: str, url: str, default_port: int) -> str:
    """Return ``url`` if the service answers; else skip (or fail when services are demanded)."""
    if _reachable(url, default_port):
        return url
    message = f"{name} is not reachable at {url} (set the URL's environment variable)"
    if DEMANDED:
        pytest.fail(message + "; TENANT_JOBS_DEMAND_SERVICES=1 demands it", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return require_service("PostgreSQL", POSTGRES_URL, 5432)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return require_service("Redis", REDIS_URL, 6379)


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    return require_service("RabbitMQ", RABBITMQ_URL, 5672)


@pytest.fixture(scope="session")
def rls_suite_url(postgres_url: str) -> t.Iterator[str]:
    """``TEST_CORE_RLS``: the URL of a role that RLS applies to and that may create
    (and so owns) tables; dropped, with its tables, at the end of the session."""
    with app_role(postgres_url, owner=True) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: t.Any) -> str:
    """Each test using it runs on SQLite and on the real PostgreSQL.

    With ``TEST_CORE_RLS=1`` (see ``tests/core_app.py``), on PostgreSQL only, as
    a role that row-level security applies to.
    """
    if request.param == "sqlite":
        if RLS_SUITE:
            pytest.skip("TEST_CORE_RLS: row-level security is PostgreSQL-only; the "
                        "SQLite runs are in the run without it")
        return f"sqlite:///{tmp_path / 'test.db'}"
    if RLS_SUITE:
        return t.cast(str, request.getfixturevalue("rls_suite_url"))
    return t.cast(str, request.getfixturevalue("postgres_url"))
