"""Flask-Caching keys belong to their tenant: cached views, memoize, the direct API and
``clear()``, on SimpleCache and the real Redis, whatever order the extensions are set up
in, and inside a real Celery worker."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import typing as t
import uuid
from dataclasses import dataclass, field

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from flask import Flask, g, render_template_string, request
from flask_caching import Cache
from flask_sqlalchemy import SQLAlchemy

from flask_tenant_jobs import TenantJobs, current_tenant, integrations, tenant_task
from flask_tenant_jobs.errors import CacheClearError, ConfigurationError, TenantError
from flask_tenant_jobs.integrations.caching import TenantScopedCache

from .worker_processes import redis_db_url

CACHE_DB = int(os.environ.get("TEST_CACHING_REDIS_DB", "14"))
TENANTS = ["acme", "acme-eu", "globex"]
ORDERS = ["cache-then-tenant-jobs", "tenant-jobs-then-cache"]
SETUPS = ["Cache(app)", "cache.init_app(app)"]

db = SQLAlchemy()
#: The cache the worker's tasks use (set up on the worker test's app).
task_cache = Cache()


@dataclass
class Site:
    """An app with one cache, a cached view, a memoized function and call counters."""

    app: Flask
    tenant_jobs: TenantJobs
    cache: Cache
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    memoized: t.Any = None

    def get(self, path: str, tenant: str | None) -> t.Any:
        host = f"{tenant}.example.test" if tenant else "example.test"
        response = self.app.test_client().get(path, base_url=f"http://{host}")
        assert response.status_code == 200, response.data
        return response.json


def build_site(cache_config: dict[str, t.Any], order: str, setup: str, **config: t.Any) -> Site:
    """A site whose ``Cache`` is set up before or after ``TenantJobs``, one way or the other."""
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=TENANTS,
        **config,
    )
    db.init_app(app)
    tenant_jobs = TenantJobs()
    cache = Cache(config=cache_config) if setup == "cache.init_app(app)" else None

    def set_up_cache() -> Cache:
        if cache is not None:
            cache.init_app(app)
            return cache
        return Cache(app, config=cache_config)

    if order == "cache-then-tenant-jobs":
        made = set_up_cache()
        tenant_jobs.init_app(app, db=db)
    else:
        tenant_jobs.init_app(app, db=db)
        made = set_up_cache()
    site = Site(app, tenant_jobs, made)

    @app.get("/orders")
    @made.cached()
    def orders() -> dict[str, t.Any]:
        site.calls.append(("orders", g.tenant))
        return {"tenant": g.tenant, "orders": [f"{g.tenant}-secret"]}

    @app.get("/search")
    @made.cached(query_string=True)
    def search() -> dict[str, t.Any]:
        site.calls.append(("search", g.tenant))
        return {"tenant": g.tenant, "q": request.args.get("q")}

    @made.memoize()
    def plan(customer: str, level: int = 1) -> str:
        site.calls.append(("plan", current_tenant()))
        return f"{current_tenant()}:{customer}:{level}"

    site.memoized = plan
    return site


@pytest.fixture(scope="module")
def redis_cache_url(redis_url: str) -> str:
    return redis_db_url(redis_url, CACHE_DB)


@pytest.fixture
def redis_cache_config(redis_cache_url: str) -> t.Iterator[dict[str, t.Any]]:
    """The real Redis, with a key prefix of this test's own (glob characters on purpose)."""
    prefix = f"ftj-test[{uuid.uuid4().hex[:8]}]*_"
    yield {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": redis_cache_url,
           "CACHE_KEY_PREFIX": prefix}
    delete_prefixed(redis_cache_url, prefix)


@pytest.fixture(params=["simple", "redis"])
def cache_config(request: pytest.FixtureRequest) -> dict[str, t.Any]:
    """SimpleCache, or the real Redis."""
    if request.param == "simple":
        return {"CACHE_TYPE": "SimpleCache"}
    return t.cast("dict[str, t.Any]", request.getfixturevalue("redis_cache_config"))


def delete_prefixed(url: str, prefix: str) -> None:
    """Delete this test's keys from the Redis database (other keys there are kept)."""
    client = redis.Redis.from_url(url)
    for key in client.scan_iter():
        if key.startswith(prefix.encode()):
            client.delete(key)
    client.close()


@pytest.fixture(params=list(itertools.product(ORDERS, SETUPS)), ids="-".join)
def site(request: pytest.FixtureRequest, cache_config: dict[str, t.Any]) -> Site:
    order, setup = request.param
    return build_site(cache_config, order, setup)


# -- cached views -------------------------------------------------------------------------


def test_cached_view_serves_each_tenant_its_own_page(site: Site) -> None:
    assert site.get("/orders", "acme") == {"tenant": "acme", "orders": ["acme-secret"]}
    assert site.get("/orders", "globex") == {"tenant": "globex", "orders": ["globex-secret"]}
    assert site.get("/orders", "acme-eu")["tenant"] == "acme-eu"
    assert site.get("/orders", None)["tenant"] is None
    assert site.get("/orders", "acme")["tenant"] == "acme"  # from the cache
    assert site.calls == [
        ("orders", "acme"), ("orders", "globex"), ("orders", "acme-eu"), ("orders", None),
    ]


def test_cached_view_with_a_query_string_is_cached_per_tenant(site: Site) -> None:
    assert site.get("/search?q=x&page=2", "acme") == {"tenant": "acme", "q": "x"}
    assert site.get("/search?page=2&q=x", "globex") == {"tenant": "globex", "q": "x"}
    assert site.get("/search?page=2&q=x", "acme") == {"tenant": "acme", "q": "x"}
    assert site.calls == [("search", "acme"), ("search", "globex")]


def test_delete_cached_deletes_the_current_tenants_page_only(site: Site) -> None:
    site.get("/orders", "acme")
    site.get("/orders", "globex")
    with site.app.test_request_context("/orders", base_url="http://acme.example.test"):
        site.app.preprocess_request()
        site.cache.delete_cached(site.app.view_functions["orders"], "/orders")
    site.get("/orders", "acme")
    site.get("/orders", "globex")
    assert site.calls.count(("orders", "acme")) == 2
    assert site.calls.count(("orders", "globex")) == 1


def test_jinja_fragment_cache_is_per_tenant(site: Site) -> None:
    template = '{% cache 60, "fragment" %}{{ tenant }}{% endcache %}'
    with site.app.app_context():
        for tenant in ["acme", "globex", None]:
            with site.tenant_jobs.switch(tenant):
                assert render_template_string(template, tenant=tenant) == str(tenant)
                assert render_template_string(template, tenant="changed") == str(tenant)


# -- memoize ------------------------------------------------------------------------------


def test_memoize_keeps_a_result_per_tenant_and_per_arguments(site: Site) -> None:
    plan = site.memoized
    with site.app.app_context():
        for _ in range(2):
            for tenant in ["acme", "acme-eu", "globex", None]:
                with site.tenant_jobs.switch(tenant):
                    assert plan("bob") == f"{tenant}:bob:1"
                    assert plan("bob", level=2) == f"{tenant}:bob:2"
                    assert plan("eve", 1) == f"{tenant}:eve:1"
    assert len(site.calls) == 12  # 4 tenants x 3 argument sets, each computed once


def test_delete_memoized_works_per_tenant(site: Site) -> None:
    plan, cache, tenant_jobs = site.memoized, site.cache, site.tenant_jobs
    with site.app.app_context():
        for tenant in ["acme", "globex"]:
            with tenant_jobs.switch(tenant):
                plan("bob")
                plan("eve")
        with tenant_jobs.switch("acme"):
            cache.delete_memoized(plan, "bob")  # one argument set
            plan("bob")
            plan("eve")
        assert site.calls.count(("plan", "acme")) == 3
        with tenant_jobs.switch("acme"):
            cache.delete_memoized(plan)  # every argument set: acme's version key
            plan("bob")
            plan("eve")
        assert site.calls.count(("plan", "acme")) == 5
        with tenant_jobs.switch("globex"):
            plan("bob")
            plan("eve")
        assert site.calls.count(("plan", "globex")) == 2  # untouched by acme's deletes
        with tenant_jobs.switch("globex"):
            cache.delete_memoized_verhash(plan)
            plan("bob")
        assert site.calls.count(("plan", "globex")) == 3


# -- the direct API -----------------------------------------------------------------------


def test_every_direct_call_stays_in_the_current_namespace(site: Site) -> None:
    cache, tenant_jobs = site.cache, site.tenant_jobs
    with site.app.app_context():
        for tenant in ["acme", "acme-eu", "globex", None]:
            with tenant_jobs.switch(tenant):
                assert cache.get("plan") is None and not cache.has("plan")
                assert cache.set("plan", f"{tenant}-gold")
                assert cache.add("plan", "overwritten") is False
                assert cache.add("seats", 3)
                backend = cache.cache  # Cache has no proxies for inc and dec
                assert backend.inc("seats") == 4 and backend.dec("seats", 2) == 2
                done = cache.set_many({"a": f"{tenant}-a", "b": f"{tenant}-b"})
                assert sorted(done) == ["a", "b"]
        for tenant in ["acme", "acme-eu", "globex", None]:
            with tenant_jobs.switch(tenant):
                assert cache.get("plan") == f"{tenant}-gold" and cache.has("plan")
                assert cache.get("seats") == 2
                assert cache.get_many("a", "b", "missing") == [f"{tenant}-a", f"{tenant}-b", None]
                assert cache.get_dict("a", "b") == {"a": f"{tenant}-a", "b": f"{tenant}-b"}
        with tenant_jobs.switch("acme"):
            assert cache.delete("plan")
            assert sorted(cache.delete_many("a", "b")) == ["a", "b"]
            cache.unlink("seats")
            assert cache.get_many("plan", "a", "b", "seats") == [None, None, None, None]
        for tenant in ["acme-eu", "globex", None]:
            with tenant_jobs.switch(tenant):
                assert cache.get_many("plan", "a", "b") == [
                    f"{tenant}-gold", f"{tenant}-a", f"{tenant}-b",
                ]


def test_direct_calls_work_without_an_app_context_like_flask_caching(site: Site) -> None:
    with site.tenant_jobs.switch("acme"):
        site.cache.set("plan", "acme-gold")
    with site.app.app_context(), site.tenant_jobs.switch("globex"):
        assert site.cache.get("plan") is None
    with site.app.app_context(), site.tenant_jobs.switch("acme"):
        assert site.cache.get("plan") == "acme-gold"


def test_keys_that_look_like_another_namespace_stay_in_their_own(site: Site) -> None:
    cache, tenant_jobs = site.cache, site.tenant_jobs
    with site.app.app_context():
        with tenant_jobs.switch("acme"):
            cache.set("plan", "acme-secret")
        with tenant_jobs.switch("acme-eu"):
            cache.set("plan", "acme-eu-secret")
        hostile = [
            "tenant:acme:plan", "../tenant:acme:plan", ":plan", "acme:plan", "-eu:plan",
            "shared:plan", "plan\x00", "*", "tenant:*", "\\", "[a-z]*",
        ]
        for tenant in ["globex", "acme", "acme-eu", None]:
            with tenant_jobs.switch(tenant):
                for key in hostile:
                    assert cache.get(key) is None, (tenant, key)
                    assert cache.get_many(key) == [None]
                    cache.set(key, f"{tenant}-hostile")
        with tenant_jobs.switch("acme"):
            assert cache.get("plan") == "acme-secret"
        with tenant_jobs.switch("acme-eu"):
            assert cache.get("plan") == "acme-eu-secret"


# -- clear() ------------------------------------------------------------------------------


def _fill(site: Site) -> None:
    with site.app.app_context():
        for tenant in ["acme", "acme-eu", "globex", None]:
            with site.tenant_jobs.switch(tenant):
                site.cache.set("plan", f"{tenant}-gold")
                site.cache.set("*", "star")


def _left(site: Site) -> dict[str | None, t.Any]:
    with site.app.app_context():
        left = {}
        for tenant in ["acme", "acme-eu", "globex", None]:
            with site.tenant_jobs.switch(tenant):
                left[tenant] = site.cache.get("plan")
        return left


def test_clear_in_a_tenant_clears_that_tenants_keys_only(site: Site) -> None:
    _fill(site)
    with site.app.app_context(), site.tenant_jobs.switch("acme"):
        assert site.cache.clear()
        assert site.cache.get("*") is None
    assert _left(site) == {
        "acme": None, "acme-eu": "acme-eu-gold", "globex": "globex-gold", None: "None-gold",
    }


def test_clear_with_no_tenant_clears_the_shared_keys_only(site: Site) -> None:
    _fill(site)
    with site.app.app_context():
        assert site.cache.clear()
    assert _left(site) == {
        "acme": "acme-gold", "acme-eu": "acme-eu-gold", "globex": "globex-gold", None: None,
    }


def test_clear_inside_without_tenant_clears_every_tenant(site: Site) -> None:
    _fill(site)
    with site.app.app_context(), site.tenant_jobs.switch("acme"), \
            site.tenant_jobs.without_tenant():
        site.cache.clear()
    assert _left(site) == {"acme": None, "acme-eu": None, "globex": None, None: None}


def test_redis_keys_keep_the_backend_prefix_outermost(
    redis_cache_url: str, redis_cache_config: dict[str, t.Any]
) -> None:
    cache_config = redis_cache_config
    site = build_site(cache_config, ORDERS[1], SETUPS[0])
    _fill(site)
    client = redis.Redis.from_url(redis_cache_url)
    prefix = cache_config["CACHE_KEY_PREFIX"].encode()
    keys = {key for key in client.scan_iter() if key.startswith(prefix)}
    assert {key[len(prefix):] for key in keys} == {
        b"tenant:acme:plan", b"tenant:acme-eu:plan", b"tenant:globex:plan", b"shared:plan",
        b"tenant:acme:*", b"tenant:acme-eu:*", b"tenant:globex:*", b"shared:*",
    }
    other = b"ftj-test-other:tenant:acme:plan"  # another app's key, same database
    client.set(other, b"kept")
    try:
        with site.app.app_context(), site.tenant_jobs.switch("acme"):
            site.cache.clear()
        assert client.get(other) == b"kept"
    finally:
        client.delete(other)
        client.close()


@pytest.mark.parametrize("tenant", ["acme", None])
def test_clear_refuses_on_a_backend_that_cannot_clear_one_namespace(
    tmp_path: t.Any, tenant: str | None
) -> None:
    config = {"CACHE_TYPE": "FileSystemCache", "CACHE_DIR": str(tmp_path)}
    site = build_site(config, ORDERS[0], SETUPS[0])
    _fill(site)
    with site.app.app_context(), site.tenant_jobs.switch(tenant), \
            pytest.raises(CacheClearError) as raised:
        site.cache.clear()
    assert isinstance(raised.value, TenantError) and raised.value.tenant == tenant
    assert "without_tenant" in str(raised.value) and "FileSystemCache" in str(raised.value)
    assert _left(site)["globex"] == "globex-gold"  # nothing was wiped
    with site.app.app_context(), site.tenant_jobs.without_tenant():
        assert site.cache.clear()
    assert _left(site) == {"acme": None, "acme-eu": None, "globex": None, None: None}


def test_null_cache_clear_is_a_no_op() -> None:
    site = build_site({"CACHE_TYPE": "NullCache", "CACHE_NO_NULL_WARNING": True}, *ORDERS[:1],
                      SETUPS[0])
    with site.app.app_context(), site.tenant_jobs.switch("acme"):
        assert site.cache.clear()


# -- set-up -------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_several_caches_on_one_app_are_all_scoped(order: str) -> None:
    app = Flask(__name__)
    app.config.update(SERVER_NAME="example.test", SQLALCHEMY_DATABASE_URI="sqlite://",
                      TENANT_JOBS_TENANTS=TENANTS)
    db.init_app(app)
    first, second = Cache(config={"CACHE_TYPE": "SimpleCache"}), Cache()
    tenant_jobs = TenantJobs()
    if order == "cache-then-tenant-jobs":
        first.init_app(app)
        second.init_app(app, config={"CACHE_TYPE": "SimpleCache"})
        tenant_jobs.init_app(app, db=db)
    else:
        tenant_jobs.init_app(app, db=db)
        first.init_app(app)
        second.init_app(app, config={"CACHE_TYPE": "SimpleCache"})
    with app.app_context():
        assert all(isinstance(b, TenantScopedCache) for b in app.extensions["cache"].values())
        assert first.cache.backend is not second.cache.backend
        for cache in (first, second):
            with tenant_jobs.switch("acme"):
                cache.set("plan", "acme-gold")
            with tenant_jobs.switch("globex"):
                assert cache.get("plan") is None


def test_a_refused_second_init_app_leaves_the_cache_wrapped_once() -> None:
    site = build_site({"CACHE_TYPE": "SimpleCache"}, ORDERS[0], SETUPS[0])
    with pytest.raises(ConfigurationError, match="already been set up"):
        site.tenant_jobs.init_app(site.app, db=db)
    with site.app.app_context():
        assert isinstance(site.cache.cache, TenantScopedCache)
        assert not isinstance(site.cache.cache.backend, TenantScopedCache)


def test_backend_attributes_are_the_wrapped_backends() -> None:
    site = build_site({"CACHE_TYPE": "SimpleCache", "CACHE_DEFAULT_TIMEOUT": 42}, ORDERS[1],
                      SETUPS[1])
    with site.app.app_context():
        assert site.cache.cache.default_timeout == 42
        assert site.cache.cache._cache is site.cache.cache.backend._cache


def test_scoping_can_be_turned_off() -> None:
    site = build_site({"CACHE_TYPE": "SimpleCache"}, ORDERS[1], SETUPS[0],
                      TENANT_JOBS_SCOPE_CACHES=False)
    assert site.get("/orders", "acme")["tenant"] == "acme"
    assert site.get("/orders", "globex")["tenant"] == "acme"  # Flask-Caching's own behaviour
    with site.app.app_context():
        assert not isinstance(site.cache.cache, TenantScopedCache)


def test_every_method_of_the_cache_api_is_scoped() -> None:
    """A method cachelib adds later must not fall through to a base-class no-op."""
    from cachelib import BaseCache as CachelibBaseCache
    from flask_caching.backends import RedisCache

    api = {
        name for cls in (CachelibBaseCache, RedisCache) for name in vars(cls)
        if not name.startswith("_") and callable(getattr(cls, name)) and name != "factory"
    }
    assert api <= set(vars(TenantScopedCache)), api - set(vars(TenantScopedCache))


# -- in a worker --------------------------------------------------------------------------


@tenant_task
def remember_in_cache(key: str, value: str) -> str | None:
    """Store ``value`` under ``key`` in the task's tenant; return what was there."""
    previous = task_cache.get(key)
    task_cache.set(key, value)
    return t.cast("str | None", previous)


@tenant_task
def memoized_plan_in_worker(customer: str) -> str:
    return worker_plan(customer)


@task_cache.memoize()
def worker_plan(customer: str) -> str:
    return f"{current_tenant()}:{customer}:{uuid.uuid4().hex[:6]}"


def test_tasks_in_a_worker_use_their_jobs_tenant_namespace(redis_cache_url: str) -> None:
    prefix = f"ftj-worker-{uuid.uuid4().hex[:8]}_"
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        TENANT_JOBS_TENANTS=TENANTS,
        CACHE_TYPE="RedisCache",
        CACHE_REDIS_URL=redis_cache_url,
        CACHE_KEY_PREFIX=prefix,
        CELERY={
            "broker_url": redis_cache_url,
            "result_backend": redis_cache_url,
            "task_default_queue": f"ftj-caching-{prefix}",
            "worker_hijack_root_logger": False,
            "worker_enable_remote_control": False,
        },
    )
    db.init_app(app)
    tenant_jobs = TenantJobs(app, db=db)
    task_cache.init_app(app)
    root = logging.getLogger()
    root_level, root_handlers = root.level, root.handlers[:]
    try:
        with start_worker(tenant_jobs.celery, pool="solo", perform_ping_check=False,
                          shutdown_timeout=30), app.app_context():
            sent = {}
            for tenant in ["acme", "acme-eu", "globex"]:
                with tenant_jobs.switch(tenant):
                    sent[tenant] = remember_in_cache.delay("plan", f"{tenant}-gold")
            assert {tenant: r.get(timeout=30) for tenant, r in sent.items()} == {
                "acme": None, "acme-eu": None, "globex": None,
            }
            with tenant_jobs.switch("acme"):
                assert remember_in_cache.delay("plan", "acme-platinum").get(timeout=30) == (
                    "acme-gold"
                )
                assert task_cache.get("plan") == "acme-platinum"  # the web side sees it too
                first = memoized_plan_in_worker.delay("bob").get(timeout=30)
                assert memoized_plan_in_worker.delay("bob").get(timeout=30) == first
                assert worker_plan("bob") == first
            with tenant_jobs.switch("globex"):
                assert task_cache.get("plan") == "globex-gold"
                other = memoized_plan_in_worker.delay("bob").get(timeout=30)
                assert other.startswith("globex:bob:") and first.startswith("acme:bob:")
            assert task_cache.get("plan") is None  # no tenant: the shared namespace
    finally:
        root.setLevel(root_level)
        root.handlers[:] = root_handlers
        delete_prefixed(redis_cache_url, prefix)
        delete_prefixed(redis_cache_url, "celery-task-meta-")


def test_flask_caching_is_not_imported_by_the_package() -> None:
    code = (
        "import sys, flask_tenant_jobs.extension; "
        "assert 'flask_caching' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_flask_caching_installed_nothing_is_set_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(integrations, "is_installed", lambda name: name != "flask_caching")
    app = Flask(__name__)
    app.config.update(SERVER_NAME="example.test", SQLALCHEMY_DATABASE_URI="sqlite://",
                      TENANT_JOBS_TENANTS=TENANTS)
    db.init_app(app)
    TenantJobs(app, db=db)
    assert "cache" not in app.extensions


def test_tenants_named_like_the_namespaces_stay_apart() -> None:
    app = Flask(__name__)
    app.config.update(SERVER_NAME="example.test", SQLALCHEMY_DATABASE_URI="sqlite://",
                      TENANT_JOBS_TENANTS=["shared", "tenant", "tenant-shared"],
                      CACHE_TYPE="SimpleCache")
    db.init_app(app)
    tenant_jobs = TenantJobs(app, db=db)
    cache = Cache(app)
    names = [None, "shared", "tenant", "tenant-shared"]
    keys = ["plan", "tenant:shared:plan", "shared:plan", ":plan"]
    with app.app_context():
        for name in names:
            with tenant_jobs.switch(name):
                for key in keys:
                    assert cache.get(key) is None, (name, key)
                    cache.set(key, (name, key))
        for name in names:
            with tenant_jobs.switch(name):
                assert [cache.get(key) for key in keys] == [(name, key) for key in keys]
        assert len(cache.cache.backend._cache) == len(names) * len(keys)
