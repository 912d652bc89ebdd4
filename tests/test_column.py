"""The column strategy (``TenantScoped``): every rule on SQLite and on the real PostgreSQL.

Data: a shared ``Plan`` (no tenant), and per tenant ``Customer`` and ``Order`` rows:
acme has customer "ann" with orders a1, a2; globex has customer "gus" with order g1.
All orders are on the shared plan "basic".
"""

from __future__ import annotations

import typing as t
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from flask import current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, aliased, joinedload, mapped_column, relationship, selectinload

from flask_tenant_jobs import (
    NoTenantError,
    TenantImmutableError,
    TenantJobs,
    TenantMismatchError,
    TenantScoped,
)

from .core_app import count_statements, make_app, tables

db = SQLAlchemy()


class Plan(db.Model):  # type: ignore[name-defined,misc]
    """Shared by all tenants: not scoped."""

    __tablename__ = "col_plan"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40))
    orders: Mapped[list[Order]] = relationship(back_populates="plan", order_by="Order.label")


class Customer(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "col_customer"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40))
    orders: Mapped[list[Order]] = relationship(back_populates="customer", order_by="Order.label")


class Order(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "col_order"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(sa.String(40))
    status: Mapped[str] = mapped_column(sa.String(20), default="pending")
    customer_id: Mapped[int | None] = mapped_column(sa.ForeignKey("col_customer.id"))
    plan_id: Mapped[int | None] = mapped_column(sa.ForeignKey("col_plan.id"))
    customer: Mapped[Customer | None] = relationship(back_populates="orders")
    plan: Mapped[Plan | None] = relationship(back_populates="orders")


Ids = dict[str, int]


def seed(tenant_jobs: TenantJobs) -> Ids:
    """Write the test data; return the primary keys by label/name."""
    plan = Plan(name="basic")
    db.session.add(plan)
    db.session.commit()
    with tenant_jobs.switch("acme"):
        ann = Customer(name="ann")
        db.session.add_all([Order(label=label, customer=ann, plan=plan) for label in ("a1", "a2")])
        db.session.commit()
    with tenant_jobs.switch("globex"):
        db.session.add(Order(label="g1", customer=Customer(name="gus"), plan=plan))
        db.session.commit()
    with tenant_jobs.without_tenant():
        ids = {o.label: o.id for o in db.session.scalars(sa.select(Order))}
        ids.update({c.name: c.id for c in db.session.scalars(sa.select(Customer))})
    ids["basic"] = plan.id
    db.session.remove()
    return ids


@contextmanager
def column_app(database_url: str, **config: t.Any) -> t.Iterator[tuple[TenantJobs, Ids]]:
    """An app with seeded tables and a pushed app context; tables dropped afterwards."""
    app, tenant_jobs = make_app(db, database_url, **config)
    with tables(app, db):
        with app.app_context():
            ids = seed(tenant_jobs)
        with app.app_context():
            yield tenant_jobs, ids


@pytest.fixture
def scoped(database_url: str) -> t.Iterator[tuple[TenantJobs, Ids]]:
    with column_app(database_url) as app_state:
        yield app_state


@pytest.fixture
def tenant_jobs(scoped: tuple[TenantJobs, Ids]) -> TenantJobs:
    return scoped[0]


@pytest.fixture
def ids(scoped: tuple[TenantJobs, Ids]) -> Ids:
    return scoped[1]


def labels(statement: sa.Select[t.Any]) -> list[str]:
    """The labels of the orders a statement returns, sorted."""
    return sorted(order.label for order in db.session.scalars(statement))


def all_orders() -> dict[str, tuple[str, str]]:
    """Every committed order row, read with Core on its own connection, across tenants.

    Returns label -> (tenant_id, status).
    """
    db.session.rollback()
    with current_app.extensions["tenant_jobs"].without_tenant(), db.engine.connect() as connection:
        rows = connection.execute(
            sa.select(Order.label, Order.tenant_id, Order.status)
        ).all()  # Core on a connection: no ORM scoping involved
    return {label: (tenant, status) for label, tenant, status in rows}


# -- reads ------------------------------------------------------------------------------


def test_select_is_filtered(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        assert labels(sa.select(Order)) == ["a1", "a2"]
        assert db.session.scalar(sa.select(sa.func.count()).select_from(Order)) == 2
        assert db.session.scalars(sa.select(Order.label).where(Order.label == "g1")).all() == []
    with tenant_jobs.switch("globex"):
        assert labels(sa.select(Order)) == ["g1"]
        assert db.session.scalars(sa.select(Customer.name)).all() == ["gus"]


def test_legacy_query_is_filtered(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        assert sorted(o.label for o in Order.query.all()) == ["a1", "a2"]
        assert Order.query.count() == 2
        assert Order.query.filter_by(label="g1").first() is None
    with tenant_jobs.switch("globex"):
        assert [o.label for o in Order.query.order_by(Order.label)] == ["g1"]


def test_session_get_is_filtered(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("acme"):
        order = db.session.get(Order, ids["a1"])
        assert order is not None and order.label == "a1"
        assert db.session.get(Order, ids["g1"]) is None
        assert db.get_or_404(Order, ids["a2"]).label == "a2"


def test_joins_are_filtered(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.without_tenant():  # a bad row: globex's order on acme's customer
        db.session.add(Order(label="g2", tenant_id="globex", customer_id=ids["ann"]))
        db.session.commit()
    with tenant_jobs.switch("acme"):
        joined = sa.select(Customer.name, Order.label).join(Customer.orders).order_by(Order.label)
        assert db.session.execute(joined).all() == [("ann", "a1"), ("ann", "a2")]
        explicit = sa.select(Order.label).join(Customer, Order.customer_id == Customer.id)
        assert sorted(db.session.scalars(explicit)) == ["a1", "a2"]
        from_shared = sa.select(Order.label).join(Plan.orders).where(Plan.name == "basic")
        assert sorted(db.session.scalars(from_shared)) == ["a1", "a2"]
    with tenant_jobs.switch("globex"):  # g2's customer is acme's: the inner join drops it
        assert db.session.execute(joined).all() == [("gus", "g1")]


def test_subqueries_are_filtered(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        has_orders = sa.select(Plan.name).where(
            sa.exists().where(Order.plan_id == Plan.id, Order.label == "a1")
        )
        assert db.session.scalars(has_orders).all() == []
        in_subquery = sa.select(Order).where(Order.id.in_(sa.select(Order.id)))
        assert labels(in_subquery) == ["g1"]


def test_aliases_are_filtered(tenant_jobs: TenantJobs) -> None:
    other = aliased(Order)
    with tenant_jobs.switch("acme"):
        assert labels(sa.select(other)) == ["a1", "a2"]
        pairs = (
            sa.select(Order.label, other.label)
            .join(other, other.plan_id == Order.plan_id)
            .where(Order.label != other.label)
        )
        assert sorted(db.session.execute(pairs).all()) == [("a1", "a2"), ("a2", "a1")]


@pytest.mark.parametrize("loader", ["lazy", "selectinload", "joinedload"])
def test_relationship_loads_are_filtered(tenant_jobs: TenantJobs, ids: Ids, loader: str) -> None:
    options = {
        "lazy": [],
        "selectinload": [selectinload(Plan.orders)],
        "joinedload": [joinedload(Plan.orders)],
    }[loader]
    with tenant_jobs.switch("acme"):
        plan = db.session.scalars(sa.select(Plan).options(*options)).unique().one()
        assert [o.label for o in plan.orders] == ["a1", "a2"]
        customer = db.session.get(Customer, ids["ann"])
        assert customer is not None and [o.label for o in customer.orders] == ["a1", "a2"]


def test_joinedload_from_a_scoped_model_is_filtered(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.without_tenant():  # a bad row: globex's order on acme's customer
        db.session.add(Order(label="g2", tenant_id="globex", customer_id=ids["ann"]))
        db.session.commit()
    db.session.remove()
    with tenant_jobs.switch("acme"):
        query = sa.select(Customer).options(joinedload(Customer.orders))
        customer = db.session.scalars(query).unique().one()
        assert [o.label for o in customer.orders] == ["a1", "a2"]


def test_many_to_one_load_of_another_tenants_object_is_empty(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.without_tenant():  # a bad row: acme's order on globex's customer
        db.session.add(Order(label="a3", tenant_id="acme", customer_id=ids["gus"]))
        db.session.commit()
    db.session.remove()
    with tenant_jobs.switch("acme"):
        order = db.session.scalars(sa.select(Order).where(Order.label == "a3")).one()
        assert order.customer is None


def test_shared_models_need_no_tenant(tenant_jobs: TenantJobs, ids: Ids) -> None:
    assert db.session.scalars(sa.select(Plan.name)).all() == ["basic"]
    assert db.session.get(Plan, ids["basic"]) is not None
    db.session.add(Plan(name="pro"))
    db.session.commit()
    db.session.execute(sa.update(Plan).where(Plan.name == "pro").values(name="max"))
    assert sorted(db.session.scalars(sa.select(Plan.name))) == ["basic", "max"]


# -- ORM update() and delete() statements ----------------------------------------------


def test_orm_update_statement_touches_only_the_current_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        result = db.session.execute(sa.update(Order).values(status="shipped"))
        assert result.rowcount == 2  # type: ignore[attr-defined]
        db.session.commit()
    assert all_orders() == {
        "a1": ("acme", "shipped"),
        "a2": ("acme", "shipped"),
        "g1": ("globex", "pending"),
    }


def test_orm_update_statement_with_where_stays_in_the_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        db.session.execute(sa.update(Order).where(Order.label == "a1").values(status="hacked"))
        db.session.commit()
    assert all_orders()["a1"] == ("acme", "pending")


def test_orm_delete_statement_touches_only_the_current_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        db.session.execute(sa.delete(Order))
        db.session.commit()
    assert sorted(all_orders()) == ["a1", "a2"]


def test_orm_update_statement_cannot_move_rows_to_another_tenant(
    tenant_jobs: TenantJobs,
) -> None:
    with tenant_jobs.switch("acme"), pytest.raises(TenantImmutableError):
        db.session.execute(sa.update(Order).values(tenant_id="globex"))
    assert all_orders()["a1"] == ("acme", "pending")


# -- ORM bulk INSERT and bulk UPDATE by primary key --------------------------------------


def test_bulk_insert_fills_the_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        db.session.execute(
            sa.insert(Order), [{"label": "b1"}, {"label": "b2", "tenant_id": "acme"}]
        )
        db.session.execute(sa.insert(Order).values(label="b3"))
        db.session.commit()
    rows = all_orders()
    assert {label: rows[label][0] for label in ("b1", "b2", "b3")} == dict.fromkeys(
        ("b1", "b2", "b3"), "acme"
    )


def test_bulk_insert_returning_objects_fills_the_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        created = db.session.scalars(
            sa.insert(Order).returning(Order), [{"label": "b1"}, {"label": "b2"}]
        ).all()
        assert [(o.label, o.tenant_id) for o in created] == [("b1", "globex"), ("b2", "globex")]


def test_multi_values_insert_fills_the_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        db.session.execute(sa.insert(Order).values([{"label": "b1"}, {"label": "b2"}]))
        db.session.commit()
    rows = all_orders()
    assert (rows["b1"][0], rows["b2"][0]) == ("globex", "globex")


INSERTS_NAMING_GLOBEX: dict[str, t.Callable[[], object]] = {
    "rows": lambda: db.session.execute(
        sa.insert(Order), [{"label": "b1"}, {"label": "b2", "tenant_id": "globex"}]
    ),
    "values": lambda: db.session.execute(sa.insert(Order).values(label="b2", tenant_id="globex")),
    "multi values": lambda: db.session.execute(
        sa.insert(Order).values([{"label": "b1"}, {"label": "b2", "tenant_id": "globex"}])
    ),
}


@pytest.mark.parametrize("form", INSERTS_NAMING_GLOBEX)
def test_bulk_insert_refuses_another_tenants_id(tenant_jobs: TenantJobs, form: str) -> None:
    with tenant_jobs.switch("acme"), pytest.raises(TenantMismatchError) as raised:
        INSERTS_NAMING_GLOBEX[form]()
    assert raised.value.tenant == "globex"
    assert sorted(all_orders()) == ["a1", "a2", "g1"]


def test_bulk_update_by_primary_key_updates_the_current_tenant(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        db.session.execute(
            sa.update(Order),
            [{"id": ids["a1"], "status": "shipped"}, {"id": ids["a2"], "status": "lost"}],
        )
        db.session.commit()
    rows = all_orders()
    assert (rows["a1"], rows["a2"], rows["g1"]) == (
        ("acme", "shipped"),
        ("acme", "lost"),
        ("globex", "pending"),
    )


def test_bulk_update_by_primary_key_never_updates_another_tenants_row(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("globex"), pytest.raises(TenantMismatchError) as raised:
        db.session.execute(
            sa.update(Order),
            [{"id": ids["g1"], "status": "shipped"}, {"id": ids["a1"], "status": "hacked"}],
        )
    assert raised.value.current == "globex"
    rows = all_orders()
    assert (rows["a1"], rows["g1"]) == (("acme", "pending"), ("globex", "pending"))


def test_bulk_update_by_primary_key_cannot_move_rows(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("acme"), pytest.raises(TenantMismatchError):
        db.session.execute(sa.update(Order), [{"id": ids["a1"], "tenant_id": "globex"}])
    assert all_orders()["a1"] == ("acme", "pending")


# -- flush -------------------------------------------------------------------------------


def test_new_objects_get_the_current_tenant_on_flush(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        order = Order(label="g2")
        db.session.add(order)
        db.session.flush()
        assert order.tenant_id == "globex"
        assert db.session.get(Order, order.id) is order
        db.session.commit()
    assert all_orders()["g2"] == ("globex", "pending")


def test_new_shared_objects_are_found_again_in_their_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("globex"):
        plan = Plan(name="pro")
        db.session.add(plan)
        db.session.flush()
        assert db.session.get(Plan, plan.id) is plan


def test_a_new_object_may_name_the_current_tenant(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        db.session.add(Order(label="a3", tenant_id="acme"))
        db.session.commit()
    assert all_orders()["a3"] == ("acme", "pending")


def test_a_new_object_of_another_tenant_is_refused(tenant_jobs: TenantJobs) -> None:
    with tenant_jobs.switch("acme"):
        db.session.add(Order(label="g2", tenant_id="globex"))
        with pytest.raises(TenantMismatchError) as raised:
            db.session.flush()
    assert (raised.value.tenant, raised.value.current) == ("globex", "acme")
    assert "g2" not in all_orders()


def test_changing_the_tenant_of_a_persisted_object_is_refused(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        order = db.session.get(Order, ids["a1"])
        assert order is not None
        order.tenant_id = "globex"
        with pytest.raises(TenantImmutableError) as raised:
            db.session.flush()
    assert raised.value.tenant == "acme"
    assert all_orders()["a1"] == ("acme", "pending")


def test_changing_the_tenant_is_refused_without_tenant_too(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.without_tenant():
        order = db.session.get(Order, ids["a1"])
        assert order is not None
        order.tenant_id = "globex"
        with pytest.raises(TenantImmutableError):
            db.session.flush()


@pytest.mark.parametrize("change", ["update", "delete"])
@pytest.mark.parametrize("committed", [False, True], ids=["loaded", "expired"])
def test_writing_an_object_of_another_tenant_is_refused(
    tenant_jobs: TenantJobs, ids: Ids, change: str, committed: bool
) -> None:
    with tenant_jobs.switch("acme"):
        order = db.session.get(Order, ids["a1"])
        assert order is not None
        if committed:
            db.session.commit()  # expires the object
    with tenant_jobs.switch("globex"):
        if change == "update":
            order.status = "hacked"
        else:
            db.session.delete(order)
        with pytest.raises(TenantMismatchError) as raised:
            db.session.flush()
    assert (raised.value.tenant, raised.value.current) == ("acme", "globex")
    assert all_orders()["a1"] == ("acme", "pending")


def test_writing_an_object_loaded_without_tenant_checks_its_owner(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.without_tenant():
        g1 = db.session.get(Order, ids["g1"])
        assert g1 is not None
    with tenant_jobs.switch("acme"):
        g1.status = "hacked"
        with pytest.raises(TenantMismatchError) as raised:
            db.session.flush()
    assert (raised.value.tenant, raised.value.current) == ("globex", "acme")


# -- no tenant ---------------------------------------------------------------------------


def add_and_flush(obj: object) -> None:
    db.session.add(obj)
    db.session.flush()


NO_TENANT_ACTIONS: dict[str, t.Callable[[Ids], object]] = {
    "select": lambda ids: db.session.scalars(sa.select(Order)).all(),
    "select join from a shared model": lambda ids: db.session.execute(
        sa.select(Plan.name).join(Plan.orders)
    ).all(),
    "select joinedload from a shared model": lambda ids: (
        db.session.scalars(sa.select(Plan).options(joinedload(Plan.orders))).unique().all()
    ),
    "select exists from a shared model": lambda ids: db.session.scalars(
        sa.select(Plan).where(sa.exists().where(Order.plan_id == Plan.id))
    ).all(),
    "query": lambda ids: Order.query.all(),
    "get": lambda ids: db.session.get(Order, ids["a1"]),
    "lazy load": lambda ids: t.cast(Plan, db.session.get(Plan, ids["basic"])).orders,
    "update": lambda ids: db.session.execute(sa.update(Order).values(status="x")),
    "delete": lambda ids: db.session.execute(sa.delete(Order)),
    "bulk insert": lambda ids: db.session.execute(sa.insert(Order), [{"label": "x"}]),
    "bulk update": lambda ids: db.session.execute(
        sa.update(Order), [{"id": ids["a1"], "status": "x"}]
    ),
    "flush": lambda ids: add_and_flush(Order(label="x")),
}


@pytest.mark.parametrize("action", NO_TENANT_ACTIONS)
def test_no_tenant_raises(tenant_jobs: TenantJobs, ids: Ids, action: str) -> None:
    with count_statements(db.engine) as sql:
        with pytest.raises(NoTenantError):
            NO_TENANT_ACTIONS[action](ids)
        scoped_statements = [s for s in sql.statements if "col_order" in s]
    assert scoped_statements == []


def test_require_tenant_off_means_unfiltered(database_url: str) -> None:
    with column_app(database_url, TENANT_JOBS_REQUIRE_TENANT=False) as (tenant_jobs, ids):
        assert labels(sa.select(Order)) == ["a1", "a2", "g1"]
        assert db.session.get(Order, ids["g1"]) is not None
        with tenant_jobs.switch("acme"):
            assert labels(sa.select(Order)) == ["a1", "a2"]
            assert db.session.get(Order, ids["g1"]) is None
        db.session.add(Order(label="g2", tenant_id="globex"))
        db.session.commit()
        db.session.add(Order(label="x"))
        with pytest.raises(NoTenantError, match="tenant_id"):
            db.session.flush()


def test_without_tenant_sees_and_writes_all_rows(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("acme"), tenant_jobs.without_tenant():
        assert labels(sa.select(Order)) == ["a1", "a2", "g1"]
        assert Order.query.count() == 3
        assert db.session.get(Order, ids["g1"]) is not None
        plan = db.session.get(Plan, ids["basic"])
        assert plan is not None and [o.label for o in plan.orders] == ["a1", "a2", "g1"]
        db.session.add(Order(label="g2", tenant_id="globex"))
        db.session.commit()
    assert all_orders()["g2"] == ("globex", "pending")


# -- switching tenants inside one app context -------------------------------------------


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.LegacyAPIWarning")  # Query.get()
def test_get_never_returns_an_object_of_the_previous_tenant(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        a1 = db.session.get(Order, ids["a1"])
        assert a1 is not None
    with tenant_jobs.switch("globex"):
        assert a1 in db.session  # still in the identity map
        assert db.session.get(Order, ids["a1"]) is None
        assert Order.query.get(ids["a1"]) is None
        assert db.session.scalars(sa.select(Order).where(Order.id == ids["a1"])).all() == []
    with tenant_jobs.switch("acme"):
        assert db.session.get(Order, ids["a1"]) is a1


def test_unscoped_objects_are_not_returned_to_a_tenant(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.without_tenant():
        g1 = db.session.get(Order, ids["g1"])
        assert g1 is not None
    with tenant_jobs.switch("acme"):
        assert db.session.get(Order, ids["g1"]) is None


def test_lazy_loads_after_a_switch_are_refused(tenant_jobs: TenantJobs, ids: Ids) -> None:
    """Loaded in globex, the collection would stay on acme's object and be handed to acme."""
    with tenant_jobs.switch("acme"):
        plan = db.session.get(Plan, ids["basic"])
        customer = db.session.get(Customer, ids["ann"])
        assert plan is not None and customer is not None
    with tenant_jobs.switch("globex"):
        with pytest.raises(TenantMismatchError) as raised:
            _ = plan.orders
        assert (raised.value.tenant, raised.value.current) == ("acme", "globex")
        with pytest.raises(TenantMismatchError):
            _ = customer.orders
    with tenant_jobs.switch("acme"):
        again = db.session.get(Plan, ids["basic"])
        assert again is plan and [o.label for o in again.orders] == ["a1", "a2"]


def test_lazy_loads_without_tenant_are_refused_on_a_tenants_object(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        plan = db.session.get(Plan, ids["basic"])
        assert plan is not None
    with tenant_jobs.without_tenant():
        with pytest.raises(TenantMismatchError):
            _ = plan.orders
        unscoped = db.session.get(Plan, ids["basic"])
        assert unscoped is not plan
        assert unscoped is not None and [o.label for o in unscoped.orders] == ["a1", "a2", "g1"]
    with tenant_jobs.switch("acme"):
        assert [o.label for o in plan.orders] == ["a1", "a2"]


def test_reading_an_expired_object_of_another_tenant_is_refused(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        a1 = db.session.get(Order, ids["a1"])
        assert a1 is not None
        db.session.commit()  # expires a1: reading it again loads its row
    with tenant_jobs.switch("globex"), pytest.raises(TenantMismatchError) as raised:
        _ = a1.status
    assert (raised.value.tenant, raised.value.current) == ("acme", "globex")
    with tenant_jobs.switch("acme"):
        assert a1.status == "pending"


def test_collections_loaded_in_the_previous_tenant_are_reloaded(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.switch("acme"):
        plan = db.session.get(Plan, ids["basic"])
        assert plan is not None and [o.label for o in plan.orders] == ["a1", "a2"]
    with tenant_jobs.switch("globex"):
        again = db.session.get(Plan, ids["basic"])
        assert again is not None and [o.label for o in again.orders] == ["g1"]
    with tenant_jobs.switch("acme"):
        assert [o.label for o in plan.orders] == ["a1", "a2"]


def test_shared_objects_loaded_without_tenant_are_not_handed_to_a_tenant(
    tenant_jobs: TenantJobs, ids: Ids
) -> None:
    with tenant_jobs.without_tenant():
        plan = db.session.get(Plan, ids["basic"])
        assert plan is not None and [o.label for o in plan.orders] == ["a1", "a2", "g1"]
    with tenant_jobs.switch("acme"):
        again = db.session.get(Plan, ids["basic"])
        assert again is not None and [o.label for o in again.orders] == ["a1", "a2"]


def test_the_identity_map_still_serves_repeated_gets(tenant_jobs: TenantJobs, ids: Ids) -> None:
    with tenant_jobs.switch("acme"):
        order = db.session.get(Order, ids["a1"])
        plan = db.session.get(Plan, ids["basic"])
    with tenant_jobs.without_tenant():
        g1 = db.session.get(Order, ids["g1"])
    with count_statements(db.engine) as sql:
        with tenant_jobs.switch("acme"):
            assert db.session.get(Order, ids["a1"]) is order
            assert db.session.get(Plan, ids["basic"]) is plan
        with tenant_jobs.without_tenant():
            assert db.session.get(Order, ids["g1"]) is g1
    assert sql.statements == []
