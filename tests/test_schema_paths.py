"""The schema strategy's read and write paths that the column-strategy hooks do not cover.

With no tenant the search_path is the shared schema alone, so any statement that
reaches a tenant table, however indirectly, must be refused rather than read the
shared schema's table of the same name (or fail with a 500). Tenant names whose
schema would be the shared schema or one PostgreSQL keeps are refused. Runs on the
real PostgreSQL with the fixtures of tests/schema_fixtures.py.
"""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import Engine
from sqlalchemy.orm import joinedload, make_transient_to_detached, selectinload

from flask_tenant_jobs.errors import (
    ConfigurationError,
    InvalidTenantNameError,
    NoTenantError,
    TenantMismatchError,
)
from tests import schema_fixtures
from tests.schema_app import (
    PREFIX,
    SHARED,
    Item,
    Tenant,
    db,
    make_run_app,
    reset_schemas,
    run_schemas,
)
from tests.schema_app import tenant_jobs as jobs

# this run's schemas, on one pooled connection (tests/schema_fixtures.py)
admin = schema_fixtures.admin
app = schema_fixtures.app
seeded = schema_fixtures.seeded

pytestmark = pytest.mark.postgres


@pytest.fixture
def shared_tenants(app: Flask, seeded: None, admin: Engine) -> None:
    """The shared ``tenants`` table with one row named like each tenant's item 1."""
    with admin.begin() as connection:
        connection.execute(
            sa.text(f'CREATE TABLE "{SHARED}".tenants (name varchar(63) PRIMARY KEY)')
        )
        connection.execute(
            sa.text(f"INSERT INTO \"{SHARED}\".tenants VALUES ('acme-1'), ('globex-1')")
        )
    for name in ("acme", "globex"):  # each tenant also has an item named like the other's
        other = "globex" if name == "acme" else "acme"
        with jobs.switch(name):
            db.session.add(Item(id=2, name=f"{other}-1"))
            db.session.commit()


INDIRECT: dict[str, t.Callable[[], object]] = {
    "join from a shared model": lambda: db.session.execute(
        sa.select(Tenant.name).join(Tenant.items)
    ).all(),
    "any()": lambda: db.session.scalars(sa.select(Tenant).where(Tenant.items.any())).all(),
    "subquery": lambda: db.session.scalars(
        sa.select(Tenant.name).where(Tenant.name.in_(sa.select(Item.name)))
    ).all(),
    "select_from()": lambda: db.session.scalar(sa.select(sa.func.count()).select_from(Item)),
    "joinedload": lambda: db.session.scalars(sa.select(Tenant).options(joinedload(Tenant.items)))
    .unique()
    .all(),
    "selectinload": lambda: db.session.scalars(
        sa.select(Tenant).options(selectinload(Tenant.items))
    ).all(),
    "Core statement": lambda: db.session.execute(sa.select(Item.__table__.c.name)).all(),
}


@pytest.mark.parametrize("with_shared_copy", [False, True], ids=["no-shared-copy", "shared-copy"])
@pytest.mark.parametrize("path", INDIRECT)
def test_no_tenant_refuses_tenant_tables_reached_indirectly(
    shared_tenants: None, path: str, with_shared_copy: bool
) -> None:
    if with_shared_copy:  # the shared schema has same-named tables: never read them
        db.create_all()
        db.session.execute(sa.text("INSERT INTO items (id, name) VALUES (9, 'acme-1')"))
        db.session.commit()
    with pytest.raises(NoTenantError):
        INDIRECT[path]()
    db.session.rollback()
    assert db.session.scalars(sa.select(Tenant.name).order_by(Tenant.name)).all() == [
        "acme-1",
        "globex-1",
    ]
    db.session.rollback()
    with jobs.switch("acme"):
        assert sorted(INDIRECT["subquery"]()) == ["acme-1", "globex-1"]  # type: ignore[arg-type]
        db.session.rollback()
    if with_shared_copy:
        with jobs.without_tenant():
            INDIRECT[path]()  # deliberate: runs on the shared schema's copy
            db.session.rollback()


def test_a_request_without_a_tenant_reaching_tenant_tables_is_a_404(
    app: Flask, shared_tenants: None
) -> None:
    @app.get("/tenants-with-items")
    def tenants_with_items() -> dict[str, list[str]]:
        query = sa.select(Tenant.name).where(Tenant.items.any())
        return {"names": list(db.session.scalars(query))}

    client = app.test_client()
    assert client.get("/tenants-with-items", base_url="http://example.test").status_code == 404
    response = client.get("/tenants-with-items", base_url="http://acme.example.test")
    assert response.json == {"names": ["acme-1", "globex-1"]}


def test_a_shared_objects_collection_never_crosses_a_switch(shared_tenants: None) -> None:
    with jobs.switch("acme"):
        acme_row = db.session.get(Tenant, "acme-1")
        assert acme_row is not None
    with jobs.switch("globex"):
        with pytest.raises(TenantMismatchError):
            _ = acme_row.items
        globex_row = db.session.get(Tenant, "acme-1")
        assert globex_row is not acme_row
        assert globex_row is not None and [i.name for i in globex_row.items] == ["acme-1"]
        assert [i.id for i in globex_row.items] == [2]
    with jobs.switch("acme"):
        assert db.session.get(Tenant, "acme-1") is acme_row
        assert [i.id for i in acme_row.items] == [1]
    db.session.rollback()


def test_an_object_added_in_one_tenant_is_never_saved_in_another(app: Flask, seeded: None) -> None:
    with jobs.switch("acme"):
        db.session.add(Item(id=5, name="acme-5"))
    with jobs.switch("globex"):
        with pytest.raises(TenantMismatchError):
            db.session.scalars(sa.select(Item)).all()  # autoflush
        db.session.rollback()
    with jobs.switch("globex"):
        assert db.session.get(Item, 5) is None
    with jobs.switch("acme"):
        assert db.session.get(Item, 5) is None


def test_identity_tokens_of_another_tenant_are_refused(app: Flask, seeded: None) -> None:
    with jobs.switch("acme"):
        assert db.session.get(Item, 1) is not None
    with jobs.switch("globex"):
        with pytest.raises(TenantMismatchError):
            db.session.get(Item, 1, identity_token="acme")
        with pytest.raises(TenantMismatchError):
            db.session.scalars(sa.select(Item), execution_options={"identity_token": "acme"})
        db.session.rollback()


def test_a_detached_stub_is_not_written_from_another_tenant(app: Flask, seeded: None) -> None:
    with jobs.switch("globex"):
        stub = Item(id=1, name="acme-1")
        make_transient_to_detached(stub)
        db.session.add(stub)
        stub.name = "renamed"
        with pytest.raises(TenantMismatchError):
            db.session.flush()
        db.session.rollback()


def test_a_tenant_whose_schema_is_the_shared_schema_is_refused(
    postgres_url: str, admin: Engine
) -> None:
    reset_schemas(admin, keep_shared=True)
    clash = make_run_app(
        postgres_url,
        TENANT_JOBS_SCHEMA_FORMAT=PREFIX + "_{tenant}",
        TENANT_JOBS_TENANTS=["shared", "acme"],
    )
    try:
        with clash.app_context():
            for call in (jobs.create, jobs.drop, jobs.migrate):
                with pytest.raises(InvalidTenantNameError, match="shared schema"):
                    call("shared")
            with pytest.raises(InvalidTenantNameError), jobs.switch("shared"):
                pass
            client = clash.test_client()
            response = client.get("/items", base_url="http://shared.example.test")
            assert response.status_code == 404
            db.session.remove()
            db.engine.dispose()
        assert SHARED in run_schemas(admin)
    finally:
        reset_schemas(admin, keep_shared=False)


def test_schema_names_postgresql_keeps_are_refused(postgres_url: str) -> None:
    with pytest.raises(ConfigurationError, match="pg_"):
        make_run_app(postgres_url, TENANT_JOBS_SCHEMA_FORMAT="pg_{tenant}")
    reserved = make_run_app(
        postgres_url,
        TENANT_JOBS_SCHEMA_FORMAT="information_{tenant}",
        TENANT_JOBS_TENANTS=["schema"],
    )
    with reserved.app_context():
        with pytest.raises(InvalidTenantNameError, match="PostgreSQL"), jobs.switch("schema"):
            pass
        with pytest.raises(InvalidTenantNameError):
            jobs.drop("schema")
        db.engine.dispose()
