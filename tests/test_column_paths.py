"""Every read and write path of the column strategy, on SQLite and on the real PostgreSQL.

Each test is a way one tenant could read, change or plant another tenant's rows
(or touch them with no tenant) through ordinary SQLAlchemy API; docs/column-strategy.md
lists them with what happens. Data: a shared ``Plan`` "basic"; per tenant ``Order``
rows (acme: a1, a2; globex: g1) and ``Tag`` rows linked to them; an unscoped
``Document`` base with a scoped single-table subclass ``Secret``, and an unscoped
``Asset`` base with a scoped joined-table subclass ``Vault`` (one of each per tenant,
plus one shared base row each).
"""

from __future__ import annotations

import copy
import gc
import pickle
import typing as t
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import (
    Mapped,
    WriteOnlyMapped,
    aliased,
    contains_eager,
    immediateload,
    joinedload,
    make_transient_to_detached,
    mapped_column,
    query_expression,
    raiseload,
    relationship,
    selectinload,
    subqueryload,
    with_expression,
    with_polymorphic,
)

from flask_tenant_jobs import (
    NoTenantError,
    TenantError,
    TenantImmutableError,
    TenantJobs,
    TenantMismatchError,
    TenantScoped,
)
from flask_tenant_jobs.scoping.column import UNSCOPED_TOKEN
from flask_tenant_jobs.scoping.criteria import key_load

from .core_app import make_app, tables

db = SQLAlchemy()

order_tags = sa.Table(
    "path_order_tag",
    db.metadata,
    sa.Column("order_id", sa.ForeignKey("path_order.id"), primary_key=True),
    sa.Column("tag_id", sa.ForeignKey("path_tag.id"), primary_key=True),
)


class Plan(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "path_plan"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40))
    orders: Mapped[list[Order]] = relationship(back_populates="plan", order_by="Order.label")
    order_log: WriteOnlyMapped[Order] = relationship(viewonly=True, order_by="Order.label")
    order_count: Mapped[int] = query_expression()


class Order(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "path_order"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(sa.String(40))
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")
    plan_id: Mapped[int | None] = mapped_column(sa.ForeignKey("path_plan.id"))
    plan: Mapped[Plan | None] = relationship(back_populates="orders")
    tags: Mapped[list[Tag]] = relationship(secondary=order_tags, order_by="Tag.name")
    lines: Mapped[list[Line]] = relationship(cascade="all, delete-orphan")


class Line(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "path_line"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("path_order.id"))


class Tag(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "path_tag"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40))


class Document(db.Model):  # type: ignore[name-defined,misc]
    """Unscoped base; ``Secret`` rows share its table (single-table inheritance)."""

    __tablename__ = "path_document"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    title: Mapped[str] = mapped_column(sa.String(40))
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "doc",
    }


class Secret(TenantScoped, Document):
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {"polymorphic_identity": "secret"}


class Asset(db.Model):  # type: ignore[name-defined,misc]
    """Unscoped base; ``Vault`` rows have their own table (joined-table inheritance)."""

    __tablename__ = "path_asset"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    name: Mapped[str] = mapped_column(sa.String(40))
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "asset",
    }


class Vault(TenantScoped, Asset):
    __tablename__ = "path_vault"
    id: Mapped[int] = mapped_column(sa.ForeignKey("path_asset.id"), primary_key=True)
    code: Mapped[str] = mapped_column(sa.String(40))
    __mapper_args__: t.ClassVar[dict[str, t.Any]] = {"polymorphic_identity": "vault"}


Ids = dict[str, int]


def seed(tenant_jobs: TenantJobs) -> Ids:
    plan = Plan(name="basic")
    db.session.add_all([plan, Document(title="public-doc"), Asset(name="public-asset")])
    db.session.commit()
    for tenant, labels in (("acme", ["a1", "a2"]), ("globex", ["g1"])):
        with tenant_jobs.switch(tenant):
            tag = Tag(name=f"{tenant}-tag")
            db.session.add_all(
                [Order(label=label, plan=plan, tags=[tag], lines=[Line()]) for label in labels]
            )
            db.session.add_all(
                [Secret(title=f"{tenant}-secret"), Vault(name=f"{tenant}-vault", code=tenant)]
            )
            db.session.commit()
    with tenant_jobs.without_tenant():
        ids = {o.label: o.id for o in db.session.scalars(sa.select(Order))}
        ids.update({d.title: d.id for d in db.session.scalars(sa.select(Document))})
        ids.update({a.name: a.id for a in db.session.scalars(sa.select(Asset))})
    ids["basic"] = plan.id
    db.session.remove()
    return ids


@pytest.fixture
def app_state(database_url: str) -> t.Iterator[tuple[TenantJobs, Ids, str]]:
    app, tenant_jobs = make_app(db, database_url)
    with tables(app, db):
        with app.app_context():
            ids = seed(tenant_jobs)
        with app.app_context():
            yield tenant_jobs, ids, db.engine.dialect.name


@pytest.fixture
def tenant_jobs(app_state: tuple[TenantJobs, Ids, str]) -> TenantJobs:
    return app_state[0]


@pytest.fixture
def ids(app_state: tuple[TenantJobs, Ids, str]) -> Ids:
    return app_state[1]


@pytest.fixture
def dialect(app_state: tuple[TenantJobs, Ids, str]) -> str:
    return app_state[2]


def orders() -> dict[str, tuple[str, str]]:
    """Every committed order row (label -> tenant, status), read with Core on its own connection."""
    db.session.rollback()
    with db.engine.connect() as connection:
        rows = connection.execute(sa.select(Order.label, Order.tenant_id, Order.status)).all()
    return {label: (tenant, status) for label, tenant, status in rows}


def titles(model: type[t.Any], column: str) -> dict[str, tuple[str | None, str]]:
    """Every committed row of an inheritance table: name -> (tenant, kind)."""
    db.session.rollback()
    table = model.__table__
    with db.engine.connect() as connection:
        if model is Document:
            query = sa.select(table.c.title, table.c.tenant_id, table.c.kind)
        else:
            vault = Vault.__table__
            query = sa.select(table.c.name, vault.c.tenant_id, table.c.kind).outerjoin(
                vault, vault.c.id == table.c.id
            )
        return {name: (tenant, kind) for name, tenant, kind in connection.execute(query)}


ORIGINAL = {"a1": ("acme", "pending"), "a2": ("acme", "pending"), "g1": ("globex", "pending")}


@contextmanager
def refused(error: type[Exception] = TenantError) -> t.Iterator[None]:
    """The block raises ``error`` (a ``TenantError``); the session is rolled back after."""
    with pytest.raises(error) as raised:
        yield
    assert isinstance(raised.value, TenantError)
    assert "\n" not in str(raised.value)
    db.session.rollback()


# -- legacy bulk methods ---------------------------------------------------------------------


def test_bulk_insert_mappings_fill_and_check_the_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        db.session.bulk_insert_mappings(Order, [{"label": "b1"}, {"label": "b2"}])
        db.session.commit()
        with refused(TenantMismatchError):
            db.session.bulk_insert_mappings(Order, [{"label": "b3", "tenant_id": "acme"}])
    with refused(NoTenantError):
        db.session.bulk_insert_mappings(Order, [{"label": "b4"}])
    with tenant_jobs.without_tenant():
        db.session.bulk_insert_mappings(Order, [{"label": "b5", "tenant_id": "acme"}])
        db.session.commit()
        with refused(NoTenantError):
            db.session.bulk_insert_mappings(Order, [{"label": "b6"}])
    rows = orders()
    assert (rows["b1"][0], rows["b2"][0], rows["b5"][0]) == ("globex", "globex", "acme")
    assert "b3" not in rows and "b4" not in rows


def test_bulk_update_mappings_never_reach_another_tenant(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("globex"):
        with refused(TenantMismatchError):
            db.session.bulk_update_mappings(Order, [{"id": ids["a1"], "status": "hacked"}])
        with refused(TenantMismatchError):
            db.session.bulk_update_mappings(Order, [{"id": ids["g1"], "tenant_id": "acme"}])
        db.session.bulk_update_mappings(Order, [{"id": ids["g1"], "status": "shipped"}])
        db.session.commit()
    with refused(NoTenantError):
        db.session.bulk_update_mappings(Order, [{"id": ids["a1"], "status": "hacked"}])
    assert orders() == {**ORIGINAL, "g1": ("globex", "shipped")}


def test_bulk_save_objects_are_checked_like_a_flush(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("globex"):
        db.session.bulk_save_objects([Order(label="b1")])
        db.session.commit()
        with refused(TenantMismatchError):
            db.session.bulk_save_objects([Order(label="b2", tenant_id="acme")])
        stub = Order(id=ids["a1"], label="a1", status="hacked", tenant_id="globex")
        make_transient_to_detached(stub)
        with refused(TenantMismatchError):
            db.session.bulk_save_objects([stub])
    with refused(NoTenantError):
        db.session.bulk_save_objects([Order(label="b3")])
    rows = orders()
    assert rows["b1"] == ("globex", "pending")
    assert {k: rows[k] for k in ORIGINAL} == ORIGINAL and "b2" not in rows and "b3" not in rows


# -- upserts ---------------------------------------------------------------------------------


def upsert(dialect: str) -> t.Any:
    return (postgresql if dialect == "postgresql" else sqlite).insert(Order)


def test_an_upsert_never_updates_another_tenants_row(
    tenant_jobs: TenantJobs, ids: Ids, dialect: str
) -> None:
    with tenant_jobs.switch("globex"):
        statement = upsert(dialect).values(id=ids["a1"], label="a1")
        statement = statement.on_conflict_do_update(
            index_elements=[Order.id], set_={"status": "hacked", "label": statement.excluded.label}
        ).returning(Order.id, Order.status)
        assert db.session.execute(statement).all() == []  # acme's row is not handed back
        db.session.commit()
        own = upsert(dialect).values(id=ids["g1"], label="g1")
        own = own.on_conflict_do_update(
            index_elements=[Order.id],
            set_={"status": "shipped", "tenant_id": own.excluded.tenant_id},
        )
        db.session.execute(own)
        db.session.commit()
    assert orders() == {**ORIGINAL, "g1": ("globex", "shipped")}


def test_an_upsert_cannot_move_rows(tenant_jobs: TenantJobs, ids: Ids, dialect: str) -> None:
    with tenant_jobs.switch("globex"):
        statement = upsert(dialect).values(id=ids["g1"], label="g1")
        with refused(TenantImmutableError):
            db.session.execute(
                statement.on_conflict_do_update(
                    index_elements=[Order.id], set_={"tenant_id": "acme"}
                )
            )
        with refused(TenantMismatchError):
            db.session.execute(
                upsert(dialect).values(id=ids["a1"], label="a1", tenant_id="acme")
                .on_conflict_do_nothing()
            )
    assert orders() == ORIGINAL


def test_an_upsert_without_a_where_clause_form_is_refused(tenant_jobs: TenantJobs) -> None:
    statement = mysql.insert(Order).values(label="x")
    with tenant_jobs.switch("globex"), refused():
        db.session.execute(statement.on_duplicate_key_update(status="hacked"))


def test_an_upsert_needs_a_tenant(tenant_jobs: TenantJobs, ids: Ids, dialect: str) -> None:
    statement = upsert(dialect).values(id=ids["a1"], label="a1")
    with refused(NoTenantError):
        db.session.execute(
            statement.on_conflict_do_update(index_elements=[Order.id], set_={"status": "x"})
        )
    assert orders() == ORIGINAL


# -- inheritance: scoped subclasses of unscoped bases ----------------------------------------


def test_an_unscoped_single_table_base_hides_other_tenants_subclass_rows(
    tenant_jobs: TenantJobs,
) -> None:
    with tenant_jobs.switch("globex"):
        found = sorted(d.title for d in db.session.scalars(sa.select(Document)))
        assert found == ["globex-secret", "public-doc"]
        alias = aliased(Document)
        assert sorted(db.session.scalars(sa.select(alias.title))) == found
        assert db.session.scalars(sa.select(Secret.title)).all() == ["globex-secret"]
        db.session.execute(sa.update(Document).values(title=Document.title + "!"))
        db.session.commit()
    assert titles(Document, "title") == {
        "public-doc!": (None, "doc"),
        "acme-secret": ("acme", "secret"),
        "globex-secret!": ("globex", "secret"),
    }


def test_an_unscoped_joined_table_base_hides_other_tenants_subclass_rows(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("globex"):
        expected = ["globex-vault", "public-asset"]
        assert sorted(a.name for a in db.session.scalars(sa.select(Asset))) == expected
        polymorphic = with_polymorphic(Asset, "*")
        assert sorted(a.name for a in db.session.scalars(sa.select(polymorphic))) == expected
        assert db.session.get(Asset, ids["acme-vault"]) is None
        with refused(TenantMismatchError):
            db.session.execute(sa.update(Asset), [{"id": ids["acme-vault"], "name": "hacked"}])
        db.session.execute(sa.update(Asset).values(name=Asset.name + "!"))
        db.session.commit()
    assert set(titles(Asset, "name")) == {"public-asset!", "globex-vault!", "acme-vault"}


def test_an_unscoped_base_with_scoped_subclasses_needs_a_tenant(tenant_jobs: TenantJobs) -> None:
    for model in (Document, Asset):
        with refused(NoTenantError):
            db.session.scalars(sa.select(model)).all()
    with tenant_jobs.without_tenant():
        assert len(db.session.scalars(sa.select(Document)).all()) == 3


def test_a_single_table_base_row_needs_no_tenant_id(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        db.session.add(Document(title="another-doc"))
        db.session.commit()
    assert titles(Document, "title")["another-doc"] == (None, "doc")


# -- with_expression() -----------------------------------------------------------------------


def order_count() -> t.Any:
    counted = sa.select(sa.func.count(Order.id)).where(Order.plan_id == Plan.id)
    return with_expression(Plan.order_count, counted.scalar_subquery())


def test_with_expression_is_filtered(tenant_jobs: TenantJobs) -> None:
    statement = sa.select(Plan).options(order_count()).execution_options(populate_existing=True)
    with tenant_jobs.switch("acme"):
        assert db.session.scalars(statement).one().order_count == 2
    with tenant_jobs.switch("globex"):
        assert db.session.scalars(statement).one().order_count == 1
    with tenant_jobs.without_tenant():
        assert db.session.scalars(statement).one().order_count == 3
    with refused(NoTenantError):
        db.session.scalars(statement).all()


def test_with_expression_on_another_table_outside_a_subquery_is_refused(
    tenant_jobs: TenantJobs,
) -> None:
    statement = sa.select(Plan).options(with_expression(Plan.order_count, Order.id))
    with tenant_jobs.switch("globex"), refused():
        db.session.scalars(statement).all()


# -- INSERT forms ------------------------------------------------------------------------------


def test_a_tenant_id_given_as_an_expression_is_refused(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        bound = sa.insert(Order).values(label="x", tenant_id=sa.bindparam("t"))
        with refused():
            db.session.execute(bound, {"t": "acme"})
        many = sa.insert(Order).values([{"label": "x", "tenant_id": sa.bindparam("t")}])
        with refused():
            db.session.execute(many, {"t": "acme"})
        subquery = sa.select(Order.tenant_id).limit(1).scalar_subquery()
        with refused():
            db.session.execute(sa.insert(Order).values(label="x", tenant_id=subquery))
        with refused(TenantMismatchError):
            db.session.execute(
                sa.insert(Order).values(tenant_id="acme"), [{"label": "x"}, {"label": "y"}]
            )
    assert orders() == ORIGINAL


def test_insert_from_select_is_scoped(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        copied = sa.select(Order.label + "-copy", Order.tenant_id)
        db.session.execute(sa.insert(Order).from_select(["label", "tenant_id"], copied))
        planted = sa.select(sa.literal("p1"), sa.literal("acme"))
        db.session.execute(sa.insert(Order).from_select(["label", "tenant_id"], planted))
        db.session.execute(sa.insert(Order).from_select(["label"], sa.select(sa.literal("p2"))))
        db.session.commit()
    rows = orders()
    assert {k: rows[k] for k in ("g1-copy", "p1", "p2")} == dict.fromkeys(
        ("g1-copy", "p1", "p2"), ("globex", "pending")
    )
    assert "a1-copy" not in rows


@pytest.mark.postgres
def test_an_insert_inside_a_cte_is_refused(tenant_jobs: TenantJobs, dialect: str) -> None:
    if dialect != "postgresql":
        pytest.skip("only PostgreSQL runs DML inside a CTE")
    planted = sa.insert(Order).values(label="p1", tenant_id="acme").returning(Order.id).cte()
    with tenant_jobs.switch("globex"), refused():
        db.session.execute(sa.select(planted.c.id)).all()
    moved = sa.update(Order).values(status="hacked").returning(Order.id).cte()
    with tenant_jobs.switch("globex"):
        assert len(db.session.execute(sa.select(moved.c.id)).all()) == 1
        db.session.commit()
    assert orders() == {**ORIGINAL, "g1": ("globex", "hacked")}




@pytest.mark.postgres
def test_an_insert_inside_a_cte_is_refused_before_the_mappers_are_configured(
    database_url: str,
) -> None:
    """Such a statement configures no mapper: the tenant tables are known from the moment
    each model class exists."""
    if not database_url.startswith("postgresql"):
        pytest.skip("only PostgreSQL runs DML inside a CTE")
    fresh = SQLAlchemy()

    class Unconfigured(TenantScoped, fresh.Model):  # type: ignore[name-defined, misc]
        __tablename__ = "path_unconfigured"
        id: Mapped[int] = mapped_column(primary_key=True)

    app, tenant_jobs = make_app(fresh, database_url)
    planted = sa.insert(Unconfigured).values(tenant_id="acme").returning(Unconfigured.id).cte()
    with app.app_context(), tenant_jobs.switch("globex"):
        assert not sa.inspect(Unconfigured).configured
        with pytest.raises(TenantError, match="inside a CTE"):
            fresh.session.execute(sa.select(planted.c.id))
        fresh.session.remove()
        fresh.engine.dispose()

@pytest.mark.postgres
def test_each_new_engine_refuses_an_insert_inside_a_cte(database_url: str) -> None:
    """SQLAlchemy keys its event registry by ``id(engine)``, and an engine's listeners live
    on its dialect: with the old dialect still referenced, a new engine at a freed one's
    address looked hooked already and ran such INSERTs unchecked."""
    if not database_url.startswith("postgresql"):
        pytest.skip("only PostgreSQL runs DML inside a CTE")
    planted = sa.insert(Order).values(label="p1", tenant_id="acme").returning(Order.id).cte()
    dialects = []  # kept alive, as anything holding an engine's dialect would
    addresses: set[int] = set()
    reused = 0
    for _ in range(100):  # or until three engines were made at a freed one's address
        app, tenant_jobs = make_app(db, database_url)
        with app.app_context(), tenant_jobs.switch("globex"):
            reused += id(db.engine) in addresses
            addresses.add(id(db.engine))
            with pytest.raises(TenantError, match="inside a CTE"):
                db.session.execute(sa.select(planted.c.id))
            db.session.remove()
            dialects.append(db.engine.dialect)
            db.engine.dispose()
        del app, tenant_jobs
        gc.collect()
        if reused == 3:
            break


# -- dml_strategy ----------------------------------------------------------------------------


def test_core_only_dml_is_refused_where_it_reaches_tenant_rows(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    core_only = {"dml_strategy": "core_only"}
    with tenant_jobs.switch("globex"):
        with refused():
            db.session.execute(
                sa.update(Order).values(status="hacked").execution_options(**core_only)
            )
        with refused():
            db.session.execute(sa.delete(Order).execution_options(**core_only))
        reaches = sa.update(Plan).where(Plan.id.in_(sa.select(Order.plan_id)))
        with refused():
            db.session.execute(reaches.values(name="x").execution_options(**core_only))
        db.session.execute(sa.update(Plan).values(name="pro").execution_options(**core_only))
        db.session.execute(
            sa.update(Order).values(status="shipped").execution_options(dml_strategy="orm")
        )
        db.session.execute(
            sa.update(Order).execution_options(dml_strategy="bulk"),
            [{"id": ids["g1"], "status": "bulk"}],
        )
        db.session.commit()
        with refused(TenantMismatchError):
            db.session.execute(
                sa.update(Order).execution_options(dml_strategy="bulk"),
                [{"id": ids["a1"], "status": "hacked"}],
            )
        db.session.execute(
            sa.insert(Order).values(label="raw").execution_options(dml_strategy="raw")
        )
        db.session.commit()
    assert orders() == {**ORIGINAL, "g1": ("globex", "bulk"), "raw": ("globex", "pending")}


@pytest.mark.parametrize("synchronize_session", ["auto", "fetch", "evaluate", False])
def test_legacy_query_update_and_delete_stay_in_the_tenant(
    tenant_jobs: TenantJobs, synchronize_session: t.Any
) -> None:
    with tenant_jobs.switch("globex"):
        query = Order.query.filter(Order.status == "pending")
        query.update({"status": "shipped"}, synchronize_session=synchronize_session)
        Order.query.filter(Order.label == "a1").delete(synchronize_session=synchronize_session)
        db.session.commit()
    assert orders() == {**ORIGINAL, "g1": ("globex", "shipped")}


def test_an_update_from_another_table_stays_in_the_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        other = aliased(Order)
        db.session.execute(
            sa.update(Order)
            .where(Order.plan_id == other.plan_id, other.label == "a1")
            .values(status="hacked")
        )
        db.session.execute(
            sa.update(Order)
            .where(Order.plan_id == Plan.id, Plan.name == "basic")
            .values(status="joined")
        )
        db.session.commit()
    assert orders() == {**ORIGINAL, "g1": ("globex", "joined")}


# -- identity map ----------------------------------------------------------------------------


def test_a_given_identity_token_of_another_tenant_is_refused(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        a1 = db.session.get(Order, ids["a1"])
        plan = db.session.get(Plan, ids["basic"])
        assert a1 is not None and plan is not None
    with tenant_jobs.switch("globex"):
        with refused(TenantMismatchError):
            db.session.get(Order, ids["a1"], identity_token="acme")
        with refused(TenantMismatchError):
            db.session.get(Plan, ids["basic"], identity_token="acme")
        with refused(TenantMismatchError):  # would key globex's rows as acme's
            db.session.scalars(sa.select(Order), execution_options={"identity_token": "acme"})
        with refused(TenantMismatchError):
            Order.query.execution_options(identity_token="acme").all()
        assert db.session.get(Order, ids["g1"], identity_token="globex") is not None
    with tenant_jobs.switch("acme"):
        assert [o.label for o in db.session.scalars(sa.select(Order).order_by(Order.label))] == [
            "a1",
            "a2",
        ]


def test_many_to_one_loads_of_another_tenants_object_are_refused(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        a1 = db.session.get(Order, ids["a1"])
        assert a1 is not None
    with tenant_jobs.switch("globex"):
        assert db.session.get(Plan, ids["basic"]) is not None  # in the identity map for globex
        with refused(TenantMismatchError):
            _ = a1.plan
    with tenant_jobs.switch("acme"):
        assert a1.plan is not None and a1.plan.name == "basic"


def test_a_detached_stub_naming_another_tenant_is_refused(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("globex"):
        stub = Order(id=ids["a1"], label="a1", status="pending", tenant_id="globex")
        make_transient_to_detached(stub)
        db.session.add(stub)
        stub.status = "hacked"
        with refused(TenantMismatchError):
            db.session.commit()
        db.session.expunge_all()
        stub = Order(id=ids["a1"], label="a1", status="pending", tenant_id="globex")
        make_transient_to_detached(stub)
        db.session.add(stub)
        db.session.delete(stub)
        with refused(TenantMismatchError):
            db.session.commit()
        db.session.expunge_all()
        stub = Order(id=ids["a2"], label="a2", status="pending", tenant_id="globex")
        make_transient_to_detached(stub)
        merged = db.session.merge(stub, load=False)
        merged.status = "hacked"
        with refused(TenantMismatchError):
            db.session.commit()
    assert orders() == ORIGINAL


def test_merge_never_reaches_another_tenants_row(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("acme"):
        a1 = db.session.get(Order, ids["a1"])
        assert a1 is not None
        db.session.expunge(a1)
    with tenant_jobs.switch("globex"):
        with refused(TenantMismatchError):
            db.session.merge(a1)
        db.session.merge(Order(id=ids["a1"], label="a1", status="hacked"))
        with pytest.raises(sa.exc.IntegrityError):  # a new row with acme's primary key
            db.session.flush()
        db.session.rollback()
        merged = db.session.merge(Order(id=ids["g1"], label="g1", status="merged"))
        assert merged.tenant_id == "globex"
        db.session.commit()
    assert orders() == {**ORIGINAL, "g1": ("globex", "merged")}


def test_refresh_of_another_tenants_object_is_refused(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("acme"):
        a1 = db.session.get(Order, ids["a1"])
        assert a1 is not None
    with tenant_jobs.switch("globex"):
        with refused(TenantMismatchError):
            db.session.refresh(a1)
        with refused(TenantMismatchError):
            db.session.get(Order, ids["a1"], populate_existing=True, identity_token="acme")
    with tenant_jobs.switch("acme"):
        db.session.refresh(a1)
        assert a1.status == "pending"


def test_get_with_for_update_is_filtered(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("globex"):
        assert db.session.get(Order, ids["a1"], with_for_update=True) is None
        assert db.session.get(Order, ids["g1"], with_for_update=True) is not None


def test_get_of_a_one_table_model_filters_by_tenant_in_its_select(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    """``get()`` of a model whose load reads one table runs past the execute hook, so its
    SELECT must name the tenant itself; models whose loads read more keep the criteria."""
    assert key_load(Order) is not None
    assert key_load(Secret) is None
    assert key_load(Vault) is None
    sent: list[str] = []

    def note(connection: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        sent.append(statement)

    sa.event.listen(db.engine, "before_cursor_execute", note)
    try:
        with tenant_jobs.switch("globex"):
            db.session.expunge_all()
            assert db.session.get(Order, ids["a1"]) is None
            assert db.session.get(Order, ids["g1"]) is not None
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", note)
    loads = [statement for statement in sent if "path_order" in statement]
    assert len(loads) == 2 and all("tenant_id" in statement for statement in loads)


def test_get_on_the_kept_statement_keeps_every_form_of_session_get(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    """The kept SELECT behind ``get()`` takes every key form ``Session.get()`` takes, and
    keeps its identity-map rules, in the tenant current at each call."""
    g1 = ids["g1"]
    with tenant_jobs.switch("globex"):
        db.session.expunge_all()
        found = db.session.get(Order, g1)
        assert found is not None and found.label == "g1"
        for key in ((g1,), [g1], {"id": g1}):
            assert db.session.get(Order, key) is found
        assert db.session.get(Order, (None,)) is None
        with pytest.raises(sa.exc.InvalidRequestError, match="Incorrect number"):
            db.session.get(Order, (g1, 1))
        with pytest.raises(sa.exc.InvalidRequestError, match="Incorrect names"):
            db.session.get(Order, {"pk": g1})
        db.session.expire(found)
        db.session.execute(sa.text("UPDATE path_order SET label = 'renamed' WHERE id = :i"),
                           {"i": g1})
        assert db.session.get(Order, g1) is found and found.label == "renamed"
        db.session.execute(sa.text("UPDATE path_order SET label = 'again' WHERE id = :i"),
                           {"i": g1})
        assert db.session.get(Order, g1) is found and found.label == "renamed"
        assert db.session.get(Order, g1, populate_existing=True) is found
        assert found.label == "again"
        db.session.expire(found)
        db.session.execute(sa.text("UPDATE path_order SET tenant_id = 'acme' WHERE id = :i"),
                           {"i": g1})
        assert db.session.get(Order, g1) is None  # as if deleted: it left this tenant
        db.session.rollback()
    with tenant_jobs.switch("acme"):
        for key in (g1, (g1,), {"id": g1}):
            assert db.session.get(Order, key) is None
        a1 = db.session.get(Order, ids["a1"])
        assert a1 is not None
        db.session.delete(a1)
        db.session.flush()
        assert db.session.get(Order, ids["a1"]) is None
        db.session.rollback()
    with tenant_jobs.without_tenant():
        assert {db.session.get(Order, i).label for i in (ids["a1"], g1)} == {"a1", "g1"}
    with pytest.raises(NoTenantError):
        db.session.get(Order, g1)
    assert orders() == ORIGINAL


def test_an_object_whose_row_moved_to_another_tenant_reads_as_deleted(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    """SQLAlchemy applies no loader criteria to refreshes: a row moved away by SQL the
    hooks never saw must not be read into the object that the previous tenant holds."""
    move = sa.text("UPDATE path_order SET tenant_id = 'acme', label = 'moved' WHERE id = :i")
    with tenant_jobs.switch("globex"):
        g1 = db.session.get(Order, ids["g1"])
        assert g1 is not None
        db.session.expire(g1)
        db.session.execute(move, {"i": ids["g1"]})
        with pytest.raises(sa.orm.exc.ObjectDeletedError):
            _ = g1.label
        db.session.rollback()
        g1 = db.session.get(Order, ids["g1"])
        assert g1 is not None
        db.session.execute(move, {"i": ids["g1"]})
        with pytest.raises(sa.exc.InvalidRequestError, match="Could not refresh"):
            db.session.refresh(g1)
        db.session.rollback()
    assert orders() == ORIGINAL


def test_get_of_an_expired_object_reloads_it_in_its_tenant(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        order = db.session.get(Order, ids["a1"])
        assert order is not None
        db.session.expire(order)
        assert db.session.get(Order, ids["a1"]) is order and order.label == "a1"
        assert db.session.get(Order, ids["g1"]) is None
    with tenant_jobs.switch("globex"):
        assert db.session.get(Order, ids["a1"]) is None


def test_an_apps_own_execute_listener_still_sees_get(tenant_jobs: TenantJobs, ids: Ids) -> None:
    seen: list[bool] = []

    def listener(state: t.Any) -> None:
        seen.append(state.is_select)

    sa.event.listen(db.session, "do_orm_execute", listener)
    try:
        with tenant_jobs.switch("globex"):
            db.session.expunge_all()
            assert db.session.get(Order, ids["a1"]) is None
            assert db.session.get(Order, ids["g1"]) is not None
    finally:
        sa.event.remove(db.session, "do_orm_execute", listener)
    assert seen == [True, True]


# -- pending objects across a switch ---------------------------------------------------------


def test_an_object_added_in_one_tenant_is_never_saved_in_another(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        db.session.add(Order(label="a3"))
    with tenant_jobs.switch("globex"), refused(TenantMismatchError):
        db.session.flush()
    with tenant_jobs.switch("acme"):
        db.session.add(Order(label="a3"))
    with tenant_jobs.switch("globex"), refused(TenantMismatchError):  # autoflush first
        db.session.scalars(sa.select(Order)).all()
    with tenant_jobs.switch("acme"):
        plan = db.session.get(Plan, ids["basic"])
        assert plan is not None
        order = Order(label="a4")
        plan.orders.append(order)  # added through the collection's cascade
    with tenant_jobs.switch("globex"), refused(TenantMismatchError):
        db.session.flush()
    with tenant_jobs.switch("acme"):
        db.session.add(Order(label="a5"))
    with tenant_jobs.without_tenant():
        db.session.commit()  # saved as the tenant it was added in
    assert orders()["a5"] == ("acme", "pending")
    assert "a3" not in orders() and "a4" not in orders()


# -- loaders and relationships ---------------------------------------------------------------

LOADERS: dict[str, t.Callable[[], t.Any]] = {
    "lazy": lambda: (),
    "joinedload": lambda: (joinedload(Plan.orders).joinedload(Order.tags),),
    "selectinload": lambda: (selectinload(Plan.orders).selectinload(Order.tags),),
    "subqueryload": lambda: (subqueryload(Plan.orders).subqueryload(Order.tags),),
    "immediateload": lambda: (immediateload(Plan.orders).immediateload(Order.tags),),
    "load_only": lambda: (selectinload(Plan.orders).load_only(Order.label),),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_is_filtered(tenant_jobs: TenantJobs, loader: str) -> None:
    with tenant_jobs.switch("globex"):
        statement = sa.select(Plan).options(*LOADERS[loader]())
        plan = db.session.scalars(statement).unique().one()
        assert [o.label for o in plan.orders] == ["g1"]
        assert [tag.name for tag in plan.orders[0].tags] == ["globex-tag"]


def test_raiseload_and_write_only_collections(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("globex"):
        plan = db.session.scalars(sa.select(Plan).options(raiseload(Plan.orders))).one()
        with pytest.raises(sa.exc.InvalidRequestError):
            _ = plan.orders
        assert [o.label for o in db.session.scalars(plan.order_log.select())] == ["g1"]


def test_contains_eager_and_populate_existing(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        statement = (
            sa.select(Plan)
            .outerjoin(Plan.orders)
            .options(contains_eager(Plan.orders))
            .execution_options(populate_existing=True)
        )
        plan = db.session.scalars(statement).unique().one()
        assert [o.label for o in plan.orders] == ["g1"]


def test_yield_per_is_filtered(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        statement = sa.select(Order.label).order_by(Order.label).execution_options(yield_per=1)
        assert db.session.scalars(statement).all() == ["a1", "a2"]


def test_secondary_relationships_and_their_joins_are_filtered(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.without_tenant():  # a bad link: acme's order tagged with globex's tag
        a1 = db.session.scalars(sa.select(Order).where(Order.label == "a1")).one()
        globex_tag = db.session.scalars(sa.select(Tag).where(Tag.name == "globex-tag")).one()
        db.session.execute(order_tags.insert().values(order_id=a1.id, tag_id=globex_tag.id))
        db.session.commit()
    db.session.remove()
    with tenant_jobs.switch("acme"):
        order = db.session.scalars(sa.select(Order).where(Order.label == "a1")).one()
        assert [tag.name for tag in order.tags] == ["acme-tag"]
        joined = sa.select(Tag.name).join(Order.tags).where(Order.label == "a1")
        assert db.session.scalars(joined).all() == ["acme-tag"]
        assert db.session.scalar(sa.select(sa.func.count(Order.id)).where(Order.tags.any())) == 2


def test_delete_cascades_stay_in_the_tenant(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("globex"):
        g1 = db.session.get(Order, ids["g1"])
        db.session.delete(g1)
        db.session.commit()
    with tenant_jobs.without_tenant():
        assert sorted(line.tenant_id for line in db.session.scalars(sa.select(Line))) == [
            "acme",
            "acme",
        ]


def test_set_operations_ctes_and_scalar_subqueries_are_filtered(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        union = sa.union(sa.select(Order.label), sa.select(Order.label + "!"))
        assert sorted(db.session.scalars(sa.select(union.subquery().c[0]))) == ["g1", "g1!"]
        cte = sa.select(Order.label).cte()
        assert db.session.scalars(sa.select(cte.c.label)).all() == ["g1"]
        counted = sa.select(sa.func.count(Order.id)).scalar_subquery()
        assert db.session.scalar(sa.select(counted)) == 1
        assert db.session.scalar(sa.select(sa.exists().where(Order.label == "a1"))) is False
        stolen = sa.select(Order.status).where(Order.label == "a1").scalar_subquery()
        db.session.execute(sa.update(Order).values(label=sa.func.coalesce(stolen, "kept")))
        db.session.commit()
    assert orders()["kept"] == ("globex", "pending")


def test_a_reused_statement_stays_in_the_tenant_it_runs_in(tenant_jobs: TenantJobs) -> None:
    """A statement object kept and executed again runs filtered past the execute hook
    (its filtered form made once): each tenant still sees its own rows only, with no
    tenant it is refused, inside ``without_tenant()`` it is not filtered, a listener of
    the application's still sees it, and an identity token of another tenant given at
    execution is refused."""
    from flask_tenant_jobs import NoTenantError

    kept = sa.select(Order.label).order_by(Order.label)
    for _ in range(2):
        with tenant_jobs.switch("acme"):
            assert db.session.scalars(kept).all() == ["a1", "a2"]
        with tenant_jobs.switch("globex"):
            assert db.session.scalars(kept).all() == ["g1"]
    with pytest.raises(NoTenantError):
        db.session.scalars(kept).all()
    with tenant_jobs.without_tenant():
        assert db.session.scalars(kept).all() == ["a1", "a2", "g1"]
    seen: list[t.Any] = []

    def note(state: t.Any) -> None:
        seen.append(state)

    sa.event.listen(db.session, "do_orm_execute", note)
    try:
        with tenant_jobs.switch("acme"):
            assert db.session.scalars(kept).all() == ["a1", "a2"]
    finally:
        sa.event.remove(db.session, "do_orm_execute", note)
    assert len(seen) == 1 and "tenant_id" in str(seen[0].statement)
    with tenant_jobs.switch("acme"), pytest.raises(TenantMismatchError):
        db.session.scalars(kept, execution_options={"identity_token": "globex"}).all()


def test_a_statement_derived_from_a_kept_one_is_filtered_as_itself(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    """A statement keeps its filtered forms on itself; the statements derived from it
    (``where()``, ``options()``, ``execution_options()``, ``params()``, an UPDATE's
    ``where()``) are copies that must not inherit them, or they would run as their parent."""
    kept = sa.select(Order.label).where(Order.label.like(sa.bindparam("pattern")))
    update = sa.update(Order).values(status="held")
    with tenant_jobs.switch("acme"):
        for _ in range(2):
            assert db.session.scalars(kept, {"pattern": "a%"}).all() == ["a1", "a2"]
        derived = [
            kept.where(Order.label == "a2"),
            kept.execution_options(populate_existing=True).where(Order.label == "a2"),
            kept.options(sa.orm.raiseload("*")).where(Order.label != "a1"),
        ]
        for statement in derived:
            assert db.session.scalars(statement, {"pattern": "a%"}).all() == ["a2"]
        assert db.session.scalars(kept.params(pattern="a2")).all() == ["a2"]
        db.session.execute(update.where(Order.id == ids["a1"]))
        db.session.execute(update.where(Order.id == ids["a2"]).values(status="done"))
        statuses = dict(db.session.execute(sa.select(Order.label, Order.status)).all())
        assert statuses == {"a1": "held", "a2": "done"}
    with tenant_jobs.switch("globex"):
        assert db.session.scalars(kept, {"pattern": "%"}).all() == ["g1"]
        assert db.session.scalars(derived[0], {"pattern": "%"}).all() == []
    db.session.rollback()


def test_a_statement_run_in_a_tenant_is_left_as_it_was(tenant_jobs: TenantJobs) -> None:
    """The filtered forms of a statement are kept beside it, never in it: once run in a
    tenant it still pickles and deep-copies outside any tenant, and a shallow copy changed
    in place runs as itself. (Kept in the statement, they carried the tenant criteria,
    whose lambda does not pickle and whose tenant parameter needs a tenant.)"""
    shared = sa.select(Plan.__table__)
    kept = sa.select(Order.label)
    with tenant_jobs.switch("acme"):
        db.session.execute(shared).all()
        assert db.session.scalars(kept).all() == ["a1", "a2"]
    assert str(pickle.loads(pickle.dumps(shared))) == str(shared)
    assert str(copy.deepcopy(shared)) == str(shared)
    changed = copy.copy(kept)
    changed._where_criteria += (Order.label == "a2",)
    with tenant_jobs.switch("acme"):
        assert db.session.scalars(changed).all() == ["a2"]


def test_objects_of_a_textual_from_statement_belong_to_their_tenant(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    """Regression: ``select(Order).from_statement(text(...))`` (SQL of the application's,
    which no criteria reach) loaded its objects under no identity token, so another
    tenant could lazy-load their relationships into them. They are keyed by the tenant
    they were loaded in (the unscoped token in ``without_tenant()``), and another
    tenant's token given to such a load is refused."""
    textual = sa.select(Order).from_statement(
        sa.text(f"SELECT * FROM {Order.__tablename__} WHERE label = :label")
    )
    with tenant_jobs.switch("acme"):
        a1 = db.session.scalars(textual, {"label": "a1"}).one()
        assert sa.inspect(a1).identity_token == "acme"
        assert db.session.get(Order, ids["a1"]) is a1
        with refused(TenantMismatchError):
            db.session.scalars(
                textual, {"label": "a1"}, execution_options={"identity_token": "globex"}
            ).all()
    with tenant_jobs.switch("globex"), refused(TenantMismatchError):
        _ = a1.tags
    db.session.expunge_all()
    with tenant_jobs.without_tenant():
        unscoped = db.session.scalars(textual, {"label": "a1"}).one()
        assert sa.inspect(unscoped).identity_token == UNSCOPED_TOKEN


def test_a_select_built_per_call_is_filtered_past_the_hook_in_its_tenant(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    """An ORM ``select()`` built per call, which runs filtered past the execute hook, sees
    its tenant's rows only and loads them under its tenant's identity token; one that
    names another tenant's identity token goes through the hook and is refused, and one
    with ``populate_existing`` goes through it too and refreshes its own tenant's objects
    only."""

    def labels() -> list[str]:
        return list(db.session.scalars(sa.select(Order.label).order_by(Order.label)))

    def by_label(label: str) -> Order | None:
        return db.session.scalars(sa.select(Order).where(Order.label == label)).first()

    with tenant_jobs.switch("acme"):
        assert labels() == ["a1", "a2"]
        a1 = by_label("a1")
        assert a1 is not None and sa.inspect(a1).identity_token == "acme"
    with tenant_jobs.switch("globex"):
        assert labels() == ["g1"]
        assert by_label("a1") is None
        assert db.session.get(Order, ids["a1"]) is None
        g1 = by_label("g1")
        assert g1 is not None and sa.inspect(g1).identity_token == "globex"
        with refused(TenantMismatchError):
            db.session.scalars(sa.select(Order).execution_options(identity_token="acme")).all()
        populate = sa.select(Order).execution_options(populate_existing=True)
        assert [order.label for order in db.session.scalars(populate)] == ["g1"]
    with tenant_jobs.switch("acme"):
        assert a1.label == "a1" and sa.inspect(a1).identity_token == "acme"


@pytest.mark.parametrize("names_no_token", [False, True])
@pytest.mark.parametrize("past_the_hook", [True, False])
def test_a_kept_statement_loads_its_objects_under_the_tenants_token(
    tenant_jobs: TenantJobs, ids: Ids, past_the_hook: bool, names_no_token: bool
) -> None:
    """A statement object executed again keys its objects by the current tenant's identity
    token, past the execute hook as through it (another listener listening): each tenant's
    ``get()`` finds its own objects in the identity map, and never another tenant's.
    Regression: a kept statement naming ``identity_token=None`` keyed them by no token."""
    kept = sa.select(Order).order_by(Order.label)
    if names_no_token:
        kept = kept.execution_options(identity_token=None)

    def note(state: t.Any) -> None:
        pass

    if not past_the_hook:
        sa.event.listen(db.session, "do_orm_execute", note)
    try:
        for _ in range(2):
            for tenant, labels in (("acme", ["a1", "a2"]), ("globex", ["g1"])):
                with tenant_jobs.switch(tenant):
                    orders = db.session.scalars(kept).all()
                    assert [order.label for order in orders] == labels
                    assert {sa.inspect(order).identity_token for order in orders} == {tenant}
                    assert db.session.get(Order, sa.inspect(orders[0]).identity[0]) is orders[0]
        with tenant_jobs.switch("globex"):
            assert db.session.get(Order, ids["a1"]) is None
    finally:
        if not past_the_hook:
            sa.event.remove(db.session, "do_orm_execute", note)


@pytest.mark.parametrize("no_token_in", [None, "statement", "session"])
@pytest.mark.parametrize("loader", [selectinload, subqueryload])
@pytest.mark.parametrize("consumed_in", ["globex", "without_tenant"])
@pytest.mark.parametrize("reused", [False, True])
def test_loads_that_follow_a_selects_rows_keep_its_tenant(
    tenant_jobs: TenantJobs,
    ids: Ids,
    loader: t.Any,
    consumed_in: str,
    reused: bool,
    no_token_in: str | None,
) -> None:
    """Regression: a SELECT of a shared model run in acme, past the execute hook, whose
    rows were read once the tenant had changed, ran its ``selectinload`` or
    ``subqueryload`` of tenant rows in the new tenant (or unscoped) and filled acme's
    shared object with globex's orders. The follow-up load inherits the SELECT's
    tenant, and is refused in another tenant as the hook refuses it; also where the
    statement or the session names ``identity_token=None``, which the follow-up inherits
    too (it hid the SELECT's tenant)."""
    statement = sa.select(Plan).options(loader(Plan.orders))
    if no_token_in == "statement":
        statement = statement.execution_options(identity_token=None)
    elif no_token_in == "session":
        session = db.session()
        session.execution_options = session.execution_options.union({"identity_token": None})
    with tenant_jobs.switch("acme"):
        if reused:  # kept and filtered in acme before
            db.session.scalars(statement).all()
            db.session.expunge_all()
        result = db.session.scalars(statement)
    if consumed_in == "globex":
        later = tenant_jobs.switch("globex")
    else:
        later = tenant_jobs.without_tenant()
    with later, refused(TenantMismatchError):
        result.all()
    db.session.expunge_all()
    with tenant_jobs.switch("acme"):
        plan = db.session.get(Plan, ids["basic"])
        assert plan is not None and [order.label for order in plan.orders] == ["a1", "a2"]
