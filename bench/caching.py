"""What caches and sessions that belong to their tenant cost.

* Cached views: a ``@cache.cached()`` view served from the cache (a hit on every
  request) through the test client, with the keys scoped to the tenant vs the same
  app with ``TENANT_JOBS_SCOPE_CACHES = False``; on SimpleCache and on Redis
  (``BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/9``; only keys under this
  run's own prefix are written and deleted). For scale, also vs a plain Flask app
  with Flask-Caching and no TenantJobs (that ratio includes tenant resolution).
* ``cache.get()`` of a present key, scoped vs the raw SimpleCache backend.
* Sessions: a request that reads a signed session cookie, per-tenant session vs
  ``TENANT_JOBS_SHARED_SESSION = True``; and a request of an app without a
  ``SECRET_KEY`` (no session at all), to show what everyone else pays.
"""

from __future__ import annotations

import os
import sys
import typing as t
import uuid

import redis
from flask import Flask, g, session
from flask_caching import Cache
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs

from . import Row, compare, redis_reachable

TENANTS = [f"t{i:02d}" for i in range(10)]
HOST = "t03.example.test"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
CACHED_VIEW_TARGET = 1.05

db = SQLAlchemy()


def _app(cache_config: dict[str, t.Any] | None, tenant_jobs: bool, **config: t.Any) -> Flask:
    """An app with a cached view at ``/orders`` and a session view at ``/me``."""
    app = Flask(__name__)
    app.config.update(SERVER_NAME="example.test", SQLALCHEMY_DATABASE_URI="sqlite://", **config)
    db.init_app(app)
    if tenant_jobs:
        app.config["TENANT_JOBS_TENANTS"] = TENANTS
        TenantJobs(app, db=db)
    cache = Cache(app, config=cache_config or {"CACHE_TYPE": "NullCache",
                                               "CACHE_NO_NULL_WARNING": True})

    @app.get("/orders")
    @cache.cached(timeout=3600)
    def orders() -> dict[str, t.Any]:
        return {"tenant": g.get("tenant"), "orders": list(range(10))}

    @app.get("/me")
    def me() -> dict[str, t.Any]:
        return {"user": session.get("user")}

    @app.get("/login")
    def login() -> str:
        session["user"] = "bob"
        return "ok"

    return app


def _getter(app: Flask, path: str, *, log_in: bool = False) -> t.Callable[[], None]:
    client = app.test_client()
    if log_in:
        client.get("/login", headers={"Host": HOST})

    def request() -> None:
        response = client.get(path, headers={"Host": HOST})
        assert response.status_code == 200, response.status_code

    request()
    return request


def _cached_view_rows(label: str, config: dict[str, t.Any], number: int) -> list[Row]:
    scoped = _getter(_app(config, True), "/orders")
    unscoped = _getter(_app(config, True, TENANT_JOBS_SCOPE_CACHES=False), "/orders")
    plain = _getter(_app(config, False), "/orders")
    return [
        compare(f"cached view, {label}: scoped keys vs TENANT_JOBS_SCOPE_CACHES=False",
                unscoped, scoped, number=number, seconds=4.0, target=CACHED_VIEW_TARGET),
        compare(f"cached view, {label}: TenantJobs vs plain Flask + Flask-Caching",
                plain, scoped, number=number),
    ]


def _cache_get_row(number: int) -> Row:
    app = _app({"CACHE_TYPE": "SimpleCache"}, True)
    cache: Cache = next(iter(app.extensions["cache"]))
    tenant_jobs: TenantJobs = app.extensions["tenant_jobs"]
    with app.app_context(), tenant_jobs.switch("t03"):
        cache.set("plan", "gold")
        scoped = cache.cache
        raw = scoped.backend  # type: ignore[attr-defined]
        raw.set("plan", "gold")
        return compare("cache.get(), SimpleCache: scoped vs the raw backend",
                       lambda: raw.get("plan"), lambda: scoped.get("plan"), number=number)


def _session_rows(number: int) -> list[Row]:
    secret = {"SECRET_KEY": "bench", "SESSION_COOKIE_DOMAIN": ".example.test"}
    bound = _getter(_app(None, True, **secret), "/me", log_in=True)
    shared = _getter(_app(None, True, TENANT_JOBS_SHARED_SESSION=True, **secret), "/me",
                     log_in=True)
    no_secret = _getter(_app(None, True), "/me")
    no_secret_shared = _getter(_app(None, True, TENANT_JOBS_SHARED_SESSION=True), "/me")
    return [
        compare("request reading a session: per-tenant vs TENANT_JOBS_SHARED_SESSION",
                shared, bound, number=number),
        compare("request, no SECRET_KEY: per-tenant vs TENANT_JOBS_SHARED_SESSION",
                no_secret_shared, no_secret, number=number),
    ]


def run() -> list[Row]:
    """All caching and session benchmarks (about 20 s)."""
    rows = _cached_view_rows("SimpleCache", {"CACHE_TYPE": "SimpleCache"}, number=20)
    if redis_reachable(REDIS_URL):
        prefix = f"bench-cache-{uuid.uuid4().hex[:8]}_"
        config = {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": REDIS_URL,
                  "CACHE_KEY_PREFIX": prefix}
        try:
            rows += _cached_view_rows("Redis", config, number=20)
        finally:
            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(match=f"{prefix}*"):
                client.delete(key)
            client.close()
    else:
        print(f"Redis not reachable at {REDIS_URL}: skipped", file=sys.stderr)
    rows.append(_cache_get_row(number=20_000))
    rows += _session_rows(number=20)
    return rows
