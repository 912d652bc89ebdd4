"""The schema strategy against the real PostgreSQL, on ONE pooled connection.

Every schema of a run is named ``ftjt<run id>_...``: the shared schema
(``TENANT_JOBS_SHARED_SCHEMA``) and one schema per tenant
(``TENANT_JOBS_SCHEMA_FORMAT``), so runs never see each other's data. Each test
starts from fresh schemas and they are all dropped afterwards.
"""

from __future__ import annotations

import logging
import threading
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column, relationship

from flask_tenant_jobs import TenantJobs, context, signals
from flask_tenant_jobs.errors import (
    InvalidTenantNameError,
    NoTenantError,
    SchemaNotFoundError,
    TenantMismatchError,
    TenantNotFoundError,
)
from tests.core_app import count_statements
from tests.schema_app import (
    CREATED,
    MIGRATE_LINES,
    PREFIX,
    SCHEMA_FORMAT,
    SHARED,
    Item,
    Note,
    Order,
    Tenant,
    db,
    make_run_app,
    reset_schemas,
    run_schemas,
    schema_of,
    tables_in,
)
from tests.schema_app import tenant_jobs as jobs

from . import schema_fixtures

pytestmark = [
    pytest.mark.postgres,
    # from the env.py that Flask-Migrate's "flask db init" writes
    pytest.mark.filterwarnings("ignore:'get_engine' is deprecated:DeprecationWarning"),
]

#: this run's schemas, on one pooled connection
admin = schema_fixtures.admin
app = schema_fixtures.app
seeded = schema_fixtures.seeded
default_path = schema_fixtures.default_path
assert_clean = schema_fixtures.assert_clean
raw_search_path = schema_fixtures.raw_search_path
hooked_search_path = schema_fixtures.hooked_search_path
item_names = schema_fixtures.item_names

ROOT = Path(__file__).resolve().parent.parent
BAD_NAMES = ["", "Acme", "acme_eu", "-acme", "acme;drop", 'a"b', "a" * 64, "ac me", "é"]


def names_in(engine: Engine, schema: str, table: str = "items") -> list[str]:
    """The ``name`` column of ``schema.table``, read with a plain engine (no strategy)."""
    with engine.connect() as connection:
        quoted = f'"{schema}"."{table}"'
        return list(connection.scalars(sa.text(f"SELECT name FROM {quoted} ORDER BY id")))


# -- 1. where the tables and rows live ---------------------------------------------------


def test_tenant_models_live_in_the_tenant_schema(app: Flask, admin: Engine) -> None:
    with jobs.switch("acme"):
        item = Item(name="anvil")
        db.session.add(item)
        db.session.flush()
        db.session.add(Note(item_id=item.id, text="heavy"))
        db.session.commit()
    tenant_tables = {"items", "notes", "orders"}
    for name in CREATED:
        assert tables_in(admin, schema_of(name)) == tenant_tables
    assert tables_in(admin, SHARED) == set()
    assert names_in(admin, schema_of("acme")) == ["anvil"]
    assert names_in(admin, schema_of("globex")) == []


def test_shared_models_stay_in_the_shared_schema(app: Flask, admin: Engine) -> None:
    with admin.begin() as connection:
        connection.execute(
            sa.text(f'CREATE TABLE "{SHARED}".tenants (name varchar(63) PRIMARY KEY)')
        )
    with jobs.switch("acme"):
        db.session.add(Tenant(name="initech"))
        db.session.commit()
    with jobs.switch("globex"):
        assert db.session.scalars(sa.select(Tenant.name)).all() == ["initech"]
        db.session.commit()
    assert db.session.scalars(sa.select(Tenant.name)).all() == ["initech"]  # no tenant needed
    db.session.commit()
    assert "tenants" not in tables_in(admin, schema_of("acme"))
    with admin.connect() as connection:
        assert connection.scalars(sa.text(f'SELECT name FROM "{SHARED}".tenants')).all() == [
            "initech"
        ]


def test_schema_names_follow_the_format(app: Flask, admin: Engine) -> None:
    assert {schema_of(name) for name in CREATED} | {SHARED} == run_schemas(admin)
    assert jobs.describe("acme-eu") == {"schema": f"{PREFIX}_t_acme-eu", "exists": "yes"}
    assert jobs.describe("ghost") == {"schema": f"{PREFIX}_t_ghost", "exists": "no"}


def test_a_hyphenated_tenant_works_end_to_end(app: Flask, admin: Engine, seeded: None) -> None:
    with jobs.switch("acme-eu"):
        db.session.add(Item(id=2, name="eu-2"))
        db.session.commit()
        assert item_names() == ["acme-eu-1", "eu-2"]
    assert names_in(admin, schema_of("acme-eu")) == ["acme-eu-1", "eu-2"]
    response = app.test_client().get("/items", base_url="http://acme-eu.example.test")
    assert response.status_code == 200
    assert response.json == {"items": ["acme-eu-1", "eu-2"]}


def test_text_sql_is_scoped_too(app: Flask, seeded: None) -> None:
    for name in CREATED:
        with jobs.switch(name):
            rows = db.session.scalars(sa.text("SELECT name FROM items")).all()
            db.session.commit()
            assert rows == [f"{name}-1"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_never_reach_sql(app: Flask, admin: Engine, name: str) -> None:
    runner = app.test_cli_runner()
    client = app.test_client()
    with count_statements(db.engine) as log:
        with pytest.raises(InvalidTenantNameError), jobs.switch(name):
            pass
        for call in (jobs.create, jobs.drop, jobs.migrate, jobs.describe):
            with pytest.raises(InvalidTenantNameError):
                call(name)
        commands = [
            ["create", "--", name],
            ["drop", "--yes", "--", name],
            ["migrate", f"--tenant={name}"],
        ]
        for args in commands:
            result = runner.invoke(args=["tenant-jobs", *args])
            assert result.exit_code != 0
            assert "Invalid tenant name" in result.output
            assert "Traceback" not in result.output
        if name == name.lower():  # hosts are matched case-insensitively: ACME is acme
            response = client.get("/items", headers={"Host": f"{name}.example.test"})
            assert response.status_code in (400, 404)
    assert log.statements == []
    assert run_schemas(admin) == {schema_of(n) for n in CREATED} | {SHARED}


# -- 2. pool safety ----------------------------------------------------------------------


def test_the_pool_reuses_one_connection(app: Flask) -> None:
    pids = set()
    for name in [*CREATED, None]:
        with jobs.switch(name):
            pids.add(db.session.scalar(sa.text("SELECT pg_backend_pid()")))
            db.session.commit()
    assert len(pids) == 1


def test_nothing_is_left_after_commit(app: Flask, seeded: None, default_path: str) -> None:
    with jobs.switch("acme"):
        db.session.add(Item(id=2, name="acme-2"))
        db.session.commit()
    assert raw_search_path() == default_path
    assert hooked_search_path() == f'"{SHARED}"'
    with jobs.switch("globex"):
        assert item_names() == ["globex-1"]
    with jobs.switch("acme"):
        assert item_names() == ["acme-1", "acme-2"]


def test_nothing_is_left_after_rollback(app: Flask, seeded: None, default_path: str) -> None:
    with jobs.switch("acme"):
        db.session.add(Item(id=2, name="acme-2"))
        db.session.flush()
        db.session.rollback()
    assert_clean(default_path)


def test_a_savepoint_rollback_never_leaves_a_stale_path(
    app: Flask, seeded: None, default_path: str
) -> None:
    """django-tenants#1262: the path set inside a savepoint is undone by its rollback.

    A cache that still believed the savepoint's path would skip setting it again,
    and the next query of that tenant would read the other tenant's rows.
    """
    with jobs.switch("acme"):
        assert db.session.scalars(sa.select(Item.name)).all() == ["acme-1"]
        savepoint = db.session.begin_nested()
        assert db.session.get(Item, 1).name == "acme-1"  # type: ignore[union-attr]
        with jobs.switch("globex"):  # the SAVEPOINT was sent on acme's path
            assert db.session.scalars(sa.select(Item.name)).all() == ["globex-1"]
            savepoint.rollback()  # PostgreSQL is back on acme's path
            path = db.session.scalar(sa.text("SHOW search_path"))
            assert path == f'"{schema_of("globex")}", "{SHARED}"'
            assert db.session.scalars(sa.select(Item.name)).all() == ["globex-1"]
            assert db.session.get(Item, 1).name == "globex-1"  # type: ignore[union-attr]
        assert db.session.scalars(sa.select(Item.name)).all() == ["acme-1"]
        db.session.commit()
    assert_clean(default_path)


def test_transaction_control_in_sql_is_followed(app: Flask, seeded: None) -> None:
    """A COMMIT or ROLLBACK TO SAVEPOINT sent as SQL ends what the path was set in too."""
    with jobs.switch("acme"):
        assert db.session.scalars(sa.text("SELECT name FROM items")).all() == ["acme-1"]
        db.session.execute(sa.text("COMMIT"))
        assert db.session.scalars(sa.text("SELECT name FROM items")).all() == ["acme-1"]
        db.session.execute(sa.text("SAVEPOINT manual"))
        with jobs.switch("globex"):
            assert db.session.scalars(sa.text("SELECT name FROM items")).all() == ["globex-1"]
            db.session.execute(sa.text("ROLLBACK TO SAVEPOINT manual"))
            assert db.session.scalars(sa.text("SELECT name FROM items")).all() == ["globex-1"]
        db.session.rollback()


def test_a_released_savepoint_keeps_the_right_path(app: Flask, seeded: None) -> None:
    with jobs.switch("acme"):
        with db.session.begin_nested(), jobs.switch("globex"):
            assert db.session.scalars(sa.select(Item.name)).all() == ["globex-1"]
        assert db.session.scalars(sa.select(Item.name)).all() == ["acme-1"]
        db.session.commit()


def test_nothing_is_left_after_an_exception(app: Flask, seeded: None, default_path: str) -> None:
    with jobs.switch("acme"):
        db.session.add(Item(id=1, name="duplicate"))
        with pytest.raises(sa.exc.IntegrityError):
            db.session.commit()
        db.session.rollback()
    with pytest.raises(ZeroDivisionError), jobs.switch("globex"):
        db.session.scalars(sa.select(Item)).all()
        raise ZeroDivisionError
    db.session.rollback()
    assert_clean(default_path)


def test_nothing_is_left_after_a_connection_goes_back_to_the_pool(
    app: Flask, seeded: None, default_path: str
) -> None:
    with jobs.switch("acme"), db.engine.connect() as connection:
        assert connection.scalars(sa.text("SELECT name FROM items")).all() == ["acme-1"]
        # closed without commit or rollback: the pool's reset-on-return ends the transaction
    assert_clean(default_path)


def test_autocommit_connections_are_scoped_and_reset(
    app: Flask, seeded: None, default_path: str
) -> None:
    """Each AUTOCOMMIT statement is its own transaction: a transaction-local path would be lost."""
    with jobs.switch("acme"):
        options = {"isolation_level": "AUTOCOMMIT"}
        with db.engine.connect().execution_options(**options) as connection:
            assert connection.scalars(sa.text("SELECT name FROM items")).all() == ["acme-1"]
            assert connection.scalars(sa.text("SELECT name FROM items")).all() == ["acme-1"]
    assert_clean(default_path)


def test_server_side_cursors_are_scoped(app: Flask, seeded: None) -> None:
    """A server-side cursor only DECLAREs its statement: the path must not be set through it."""
    for name in CREATED:
        with jobs.switch(name):
            stmt = sa.select(Item.name).execution_options(yield_per=1)
            assert db.session.scalars(stmt).all() == [f"{name}-1"]
            db.session.commit()


def test_engine_use_outside_an_app_context(app: Flask, seeded: None) -> None:
    engine = db.engine
    found: list[object] = []

    def use_engine() -> None:  # a new thread: no app context
        try:
            with context.active("globex"), engine.connect() as connection:
                found.extend(connection.scalars(sa.text("SELECT name FROM items")))
        except Exception as error:
            found.append(error)

    thread = threading.Thread(target=use_engine)
    thread.start()
    thread.join()
    assert found == ["globex-1"]


def test_no_tenant_never_falls_through_to_the_shared_schema(app: Flask, seeded: None) -> None:
    db.create_all()  # no tenant: the tenant tables are made in the shared schema as well
    db.session.execute(sa.text("INSERT INTO items (id, name) VALUES (1, 'shared-1')"))
    db.session.commit()
    queries: list[t.Callable[[], object]] = [
        lambda: db.session.scalars(sa.select(Item)).all(),
        lambda: db.session.get(Item, 1),
        lambda: Item.query.all(),
        lambda: db.session.execute(sa.select(Note.text).join(Note.item)).all(),
        lambda: db.session.execute(sa.update(Item).values(name="x")),
        lambda: db.session.execute(sa.delete(Item)),
    ]
    for query in queries:
        with pytest.raises(NoTenantError):
            query()
        db.session.rollback()
    db.session.add(Item(id=5, name="new"))
    with pytest.raises(NoTenantError):
        db.session.flush()
    db.session.rollback()
    with jobs.switch("acme"):
        obj = db.session.get(Item, 1)
        assert obj is not None and obj.name == "acme-1"
    obj.name = "changed without a tenant"
    with pytest.raises(NoTenantError):
        db.session.flush()
    db.session.rollback()
    assert db.session.scalars(sa.text("SELECT name FROM items")).all() == ["shared-1"]
    db.session.commit()


def test_without_require_tenant_no_tenant_means_the_shared_schema(
    postgres_url: str, app: Flask, seeded: None
) -> None:
    relaxed = make_run_app(postgres_url, TENANT_JOBS_REQUIRE_TENANT=False)
    with relaxed.app_context():
        db.create_all()
        db.session.add(Item(id=1, name="shared-1"))
        db.session.commit()
        assert item_names() == ["shared-1"]
        db.session.remove()
        db.engine.dispose()


# -- 3. identity map -----------------------------------------------------------------------


def test_the_same_primary_key_in_two_tenants(app: Flask, seeded: None) -> None:
    for _ in range(3):
        for name in ["acme", "globex", "acme-eu", "globex"]:
            with jobs.switch(name):
                assert db.session.get(Item, 1).name == f"{name}-1"  # type: ignore[union-attr]
                assert db.session.scalars(sa.select(Item)).one().name == f"{name}-1"
                assert db.session.execute(sa.select(Item.name)).scalar_one() == f"{name}-1"
                assert Item.query.filter_by(id=1).one().name == f"{name}-1"
    with jobs.switch("acme"):
        acme_item = db.session.get(Item, 1)
    with jobs.switch("globex"):
        globex_item = db.session.get(Item, 1)
    assert acme_item is not globex_item
    db.session.commit()


def test_an_object_of_another_tenant_is_never_refreshed_or_saved_here(
    app: Flask, seeded: None
) -> None:
    with jobs.switch("acme"):
        acme_item = db.session.get(Item, 1)
        assert acme_item is not None
        db.session.add(Note(item_id=1, text="acme note"))
        db.session.commit()  # expires acme_item
    with jobs.switch("globex"):
        with pytest.raises(TenantMismatchError):
            acme_item.name  # noqa: B018 - a refresh would read globex's row 1
        with pytest.raises(TenantMismatchError):
            db.session.refresh(acme_item)
        db.session.rollback()
    with jobs.switch("acme"):
        assert acme_item.name == "acme-1"
        assert [note.text for note in acme_item.notes] == ["acme note"]
        acme_item.name = "renamed"
        db.session.expire(acme_item, ["notes"])
    with jobs.switch("globex"):
        with pytest.raises(TenantMismatchError):
            acme_item.notes  # noqa: B018 - a lazy load would read globex's notes
        with pytest.raises(TenantMismatchError):
            db.session.flush()
        db.session.rollback()
    with jobs.switch("acme"):
        assert item_names() == ["acme-1"]


# -- 4. missing schemas ---------------------------------------------------------------------


def test_switching_to_a_tenant_without_a_schema(app: Flask) -> None:
    with pytest.raises(SchemaNotFoundError) as caught, jobs.switch("ghost"):
        pass
    assert caught.value.tenant == "ghost"
    assert caught.value.schema == schema_of("ghost")
    assert jobs.current is None
    with pytest.raises(TenantNotFoundError), jobs.switch("initech"):
        pass


def test_a_request_to_a_tenant_without_a_schema_is_a_404(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/items", base_url="http://ghost.example.test").status_code == 404
    assert client.get("/items", base_url="http://nobody.example.test").status_code == 404
    assert client.get("/items", base_url="http://acme.example.test").status_code == 200


def test_a_schema_dropped_behind_the_cache_is_never_read_through(
    app: Flask, admin: Engine, seeded: None
) -> None:
    db.create_all()  # the shared schema has an items table too
    db.session.execute(sa.text("INSERT INTO items (id, name) VALUES (1, 'shared-1')"))
    db.session.commit()
    jobs.validate("acme-eu")  # cached as existing
    with admin.begin() as connection:
        connection.execute(sa.schema.DropSchema(schema_of("acme-eu"), cascade=True))
    client = app.test_client()
    assert client.get("/items", base_url="http://acme-eu.example.test").status_code == 404
    db.session.remove()
    with pytest.raises(SchemaNotFoundError), jobs.switch("acme-eu"):
        pass
    with jobs.switch("acme"):
        assert item_names() == ["acme-1"]


def test_a_schema_dropped_behind_the_cache_is_a_logged_404_and_json_for_json_clients(
    app: Flask, admin: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    jobs.validate("acme-eu")  # cached as existing
    with admin.begin() as connection:
        connection.execute(sa.schema.DropSchema(schema_of("acme-eu"), cascade=True))
    client = app.test_client()
    with caplog.at_level(logging.WARNING):
        response = client.get(
            "/items", base_url="http://acme-eu.example.test", headers={"Accept": "application/json"}
        )
    assert response.status_code == 404
    assert response.get_json() == {"error": "No such tenant.", "status": 404}
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage().startswith("SchemaNotFoundError in view 'items'")
    assert f"The schema '{schema_of('acme-eu')}' of tenant 'acme-eu' does not exist" in (
        record.getMessage()
    )


# -- 5. lifecycle -------------------------------------------------------------------------


def test_create_and_drop_with_signals(app: Flask, admin: Engine) -> None:
    created: list[str] = []
    dropped: list[str] = []

    def on_created(sender: Flask, tenant: str) -> None:
        created.append(tenant)

    def on_dropped(sender: Flask, tenant: str) -> None:
        dropped.append(tenant)

    with (
        signals.tenant_created.connected_to(on_created, app),
        signals.tenant_dropped.connected_to(on_dropped, app),
    ):
        jobs.create("ghost")
        assert tables_in(admin, schema_of("ghost")) == {"items", "notes", "orders"}
        with jobs.switch("ghost"):
            db.session.add(Item(id=1, name="boo"))
            db.session.commit()
        jobs.create("ghost")  # again: nothing lost
        assert names_in(admin, schema_of("ghost")) == ["boo"]
        jobs.drop("ghost")
    assert created == ["ghost", "ghost"]
    assert dropped == ["ghost"]
    assert schema_of("ghost") not in run_schemas(admin)
    with pytest.raises(SchemaNotFoundError), jobs.switch("ghost"):
        pass


def test_a_failed_create_leaves_no_schema(
    app: Flask, admin: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = type(app.extensions["tenant_jobs"]._state().strategy)
    create_tables = strategy._create_tables

    def create_then_fail(self: t.Any, connection: t.Any, schema: str) -> None:
        create_tables(self, connection, schema)
        raise RuntimeError("disk full")

    monkeypatch.setattr(strategy, "_create_tables", create_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        jobs.create("ghost")
    assert schema_of("ghost") not in run_schemas(admin)


def test_tenants_read_from_a_shared_table(postgres_url: str, app: Flask, admin: Engine) -> None:
    """The documented recipe: ``TENANT_JOBS_TENANTS`` reads a shared ``tenants`` table."""

    def tenant_names() -> list[str]:
        with db.engine.connect() as connection:
            return list(connection.scalars(sa.select(Tenant.name)))

    recipe = make_run_app(
        postgres_url, TENANT_JOBS_TENANTS=tenant_names, TENANT_JOBS_CACHE_SECONDS=3600
    )
    with recipe.app_context():
        db.metadata.create_all(db.engine, tables=[Tenant.__table__])
        assert jobs.tenant_names() == []
        db.session.add(Tenant(name="initech"))
        db.session.commit()
        with pytest.raises(TenantNotFoundError), jobs.switch("initech"):
            pass  # still cached
        jobs.create("initech")  # refreshes the cache
        with jobs.switch("initech"):
            db.session.add(Item(name="stapler"))
            db.session.commit()
            assert item_names() == ["stapler"]
        db.session.remove()
        db.engine.dispose()
    assert names_in(admin, schema_of("initech")) == ["stapler"]


def test_a_tenant_table_referencing_a_shared_table(postgres_url: str, admin: Engine) -> None:
    """The shared model names its schema, so create() does not move it into the tenant's."""
    reset_schemas(admin, keep_shared=True)
    other_db = SQLAlchemy()

    class Plan(other_db.Model):  # type: ignore[name-defined,misc]
        __tenant_shared__ = True
        __tablename__ = "plans"
        __table_args__ = {"schema": SHARED}  # noqa: RUF012 - SQLAlchemy's class attribute
        id: Mapped[int] = mapped_column(primary_key=True)

    class Subscription(other_db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "subscriptions"
        id: Mapped[int] = mapped_column(primary_key=True)
        plan_id: Mapped[int] = mapped_column(sa.ForeignKey(Plan.id))
        plan: Mapped[Plan] = relationship()

    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=postgres_url, SERVER_NAME="example.test",
        TENANT_JOBS_STRATEGY="schema", TENANT_JOBS_TENANTS=CREATED,
        TENANT_JOBS_SCHEMA_FORMAT=SCHEMA_FORMAT, TENANT_JOBS_SHARED_SCHEMA=SHARED,
    )
    other_db.init_app(app)
    extension = TenantJobs(app, db=other_db)
    try:
        with app.app_context():
            other_db.metadata.create_all(other_db.engine, tables=[Plan.__table__])
            extension.create("acme")
            with extension.switch("acme"):
                other_db.session.add(Subscription(plan=Plan(id=7)))
                other_db.session.commit()
                subscription = other_db.session.scalars(sa.select(Subscription)).one()
                assert subscription.plan.id == 7
            other_db.session.remove()
            other_db.engine.dispose()
        assert tables_in(admin, schema_of("acme")) == {"subscriptions"}
        assert tables_in(admin, SHARED) == {"plans"}
    finally:
        reset_schemas(admin, keep_shared=False)


def test_drop_counts_rows_of_tables_with_hostile_names(app: Flask, admin: Engine) -> None:
    """Tables a tenant made itself, with quotes and SQL in their names, are counted, not run."""
    schema = schema_of("acme-eu")
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE TABLE "{schema}"."we""ird; DROP TABLE x" (id int)'))
        connection.execute(sa.text(f'INSERT INTO "{schema}"."we""ird; DROP TABLE x" VALUES (1)'))
    assert jobs.drop("acme-eu") == {
        "items": 0, "notes": 0, "orders": 0, 'we"ird; DROP TABLE x': 1
    }
    assert schema not in run_schemas(admin)


# -- 7. TenantScoped models in schema mode ------------------------------------------------


def test_tenant_scoped_models_still_get_their_tenant_id(app: Flask, admin: Engine) -> None:
    for name in ["acme", "globex"]:
        with jobs.switch(name):
            order = Order()
            db.session.add(order)
            db.session.flush()
            assert order.tenant_id == name
            db.session.commit()
    with jobs.switch("acme"):
        assert [o.tenant_id for o in db.session.scalars(sa.select(Order))] == ["acme"]
        with pytest.raises(TenantMismatchError):
            db.session.add(Order(tenant_id="globex"))
            db.session.flush()
        db.session.rollback()
    with admin.connect() as connection:
        query = f'SELECT tenant_id FROM "{schema_of("globex")}".orders'
        assert connection.scalars(sa.text(query)).all() == ["globex"]


# -- Alembic through Flask-Migrate --------------------------------------------------------

REVISION = '''"""{message}"""
import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = {down_revision!r}
branch_labels = None
depends_on = None


def upgrade():
    {upgrade}


def downgrade():
    pass
'''
CREATE_WIDGETS = (
    'op.create_table("widgets", sa.Column("id", sa.Integer, primary_key=True), '
    'sa.Column("name", sa.String(50)))'
)
WRITES = ("CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE")


def add_revision(directory: Path, revision: str, down_revision: str | None, upgrade: str) -> None:
    text = REVISION.format(
        message=f"revision {revision}", revision=revision, down_revision=down_revision,
        upgrade=upgrade,
    )
    (directory / "versions" / f"{revision}.py").write_text(text)


def revision_in(engine: Engine, schema: str) -> list[str]:
    with engine.connect() as connection:
        query = f'SELECT version_num FROM "{schema}".alembic_version'
        return list(connection.scalars(sa.text(query)))


@pytest.fixture
def migrations(postgres_url: str, admin: Engine, tmp_path: Path) -> t.Iterator[tuple[Flask, Path]]:
    """An app with Flask-Migrate, a migrations directory made by ``flask db init`` and one
    hand-written revision creating ``widgets``; acme, globex and acme-eu created with it."""
    from flask_migrate import Migrate

    reset_schemas(admin, keep_shared=True)
    app = make_run_app(postgres_url)
    directory = tmp_path / "migrations"
    Migrate(app, db, directory=str(directory))
    result = app.test_cli_runner().invoke(args=["db", "init"])
    assert result.exit_code == 0, result.output
    env = directory / "env.py"
    # Leave the test process's logging alone (env.py would reconfigure it per run).
    env.write_text(env.read_text().replace("fileConfig(config.config_file_name)", "pass"))
    add_revision(directory, "0001", None, CREATE_WIDGETS)
    with app.app_context():
        for name in CREATED:
            jobs.create(name)
        yield app, directory
        db.session.remove()
        db.engine.dispose()
    reset_schemas(admin, keep_shared=False)


def test_alembic_create_migrates_the_tenant_schema(
    migrations: tuple[Flask, Path], admin: Engine
) -> None:
    app, _ = migrations
    for name in CREATED:
        assert tables_in(admin, schema_of(name)) == {"widgets", "alembic_version"}
        assert revision_in(admin, schema_of(name)) == ["0001"]
    assert tables_in(admin, SHARED) == set()
    assert "version_table_schema" not in app.extensions["migrate"].configure_args
    with jobs.switch("acme"):
        db.session.execute(sa.text("INSERT INTO widgets (name) VALUES ('sprocket')"))
        db.session.commit()
    assert names_in(admin, schema_of("acme"), "widgets") == ["sprocket"]


def test_alembic_a_shared_version_table_is_not_the_tenants(
    migrations: tuple[Flask, Path], admin: Engine
) -> None:
    app, _ = migrations
    result = app.test_cli_runner().invoke(args=["db", "upgrade"])  # the shared schema
    assert result.exit_code == 0, result.output
    assert revision_in(admin, SHARED) == ["0001"]
    jobs.create("ghost")
    assert tables_in(admin, schema_of("ghost")) == {"widgets", "alembic_version"}
    assert revision_in(admin, schema_of("ghost")) == ["0001"]


def test_alembic_migrate_list_and_failures(migrations: tuple[Flask, Path], admin: Engine) -> None:
    app, directory = migrations
    runner = app.test_cli_runner()
    result = runner.invoke(args=["tenant-jobs", "list"])
    assert result.output.splitlines() == [
        f"acme  schema={schema_of('acme')}  exists=yes  revision=0001",
        f"acme-eu  schema={schema_of('acme-eu')}  exists=yes  revision=0001",
        f"ghost  schema={schema_of('ghost')}  exists=no",
        f"globex  schema={schema_of('globex')}  exists=yes  revision=0001",
    ]

    with count_statements(db.engine) as log:  # nothing to do: nothing written
        result = runner.invoke(args=["tenant-jobs", "migrate", "--tenant", "acme"])
    assert (result.exit_code, result.output) == (0, "acme: ok\nmigrated 1 of 1 tenants\n")
    assert log.statements
    assert not [s for s in log.statements if s.lstrip().upper().startswith(WRITES)]

    add_column = 'op.add_column("widgets", sa.Column("colour", sa.Text))'
    add_revision(directory, "0002", "0001", add_column)
    result = runner.invoke(args=["tenant-jobs", "migrate", "--jobs", "4"])
    assert result.exit_code == 1
    assert sorted(result.output.splitlines()[:4]) == MIGRATE_LINES
    for name in CREATED:
        assert revision_in(admin, schema_of(name)) == ["0002"]
        with admin.connect() as connection:
            columns = sa.inspect(connection).get_columns("widgets", schema=schema_of(name))
            assert "colour" in {column["name"] for column in columns}
    result = runner.invoke(args=["tenant-jobs", "list"])
    assert f"acme  schema={schema_of('acme')}  exists=yes  revision=0002" in result.output

    add_revision(directory, "0003", "0002", 'op.execute("SELECT * FROM no_such_table")')
    result = runner.invoke(args=["tenant-jobs", "migrate", "--tenant", "globex"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        'globex: failed: ProgrammingError: (psycopg.errors.UndefinedTable) relation '
        '"no_such_table" does not exist',
        "migrated 0 of 1 tenants",
        "Error: failed tenants: globex",
    ]
    assert revision_in(admin, schema_of("globex")) == ["0002"]  # rolled back as a whole

    with pytest.raises(sa.exc.ProgrammingError):
        jobs.create("ghost")
    assert schema_of("ghost") not in run_schemas(admin)
    assert "version_table_schema" not in app.extensions["migrate"].configure_args
