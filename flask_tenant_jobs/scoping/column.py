"""Column strategy: every tenant's rows in shared tables, told apart by ``tenant_id``.

``TenantScoped`` adds the column; two session hooks do the rest:

* ``do_orm_execute`` adds ``tenant_id = <current>`` to every ORM SELECT,
  UPDATE and DELETE (joins, aliases and relationship loads included), fills
  and checks ``tenant_id`` in ORM bulk INSERT/UPDATE parameters, and loads
  objects under an identity token naming the tenant, so that after a switch
  the identity map never hands back another tenant's object;
* ``before_flush`` assigns ``tenant_id`` to new objects and refuses writes to
  objects of another tenant.
"""

from __future__ import annotations

import typing as t
from functools import lru_cache

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.orm import (
    Mapped,
    ORMExecuteState,
    Session,
    UOWTransaction,
    mapped_column,
    with_loader_criteria,
)
from sqlalchemy.orm.util import LoaderCriteriaOption

from .. import context
from ..errors import NoTenantError, TenantImmutableError, TenantMismatchError
from ..settings import current_settings

#: Identity token of objects loaded while no filter applies (``without_tenant``).
#: It is not a valid tenant name, so such objects never answer a tenant's lookups.
UNSCOPED_TOKEN = "*"


class TenantScoped:
    """Mixin for models whose rows belong to one tenant (column strategy).

    Adds an indexed, non-null ``tenant_id`` column; queries are filtered to the
    current tenant and new objects take its name on flush.
    """

    tenant_id: Mapped[str] = mapped_column(
        sa.String(63), index=True, nullable=False, active_history=True
    )


class ColumnStrategy:
    """Scopes ``TenantScoped`` models by their ``tenant_id`` column."""

    def install(self, app: Flask, db: SQLAlchemy) -> None:
        """Listen on ``db.session``'s session class (once per ``db``)."""
        if not event.contains(db.session, "do_orm_execute", scope_orm_execute):
            event.listen(db.session, "do_orm_execute", scope_orm_execute)
            event.listen(db.session, "before_flush", check_flush)

    def check_tenant(self, name: str) -> None:
        """Any known tenant can be entered: its rows simply share the tables."""

    def create(self, name: str) -> None:
        """Nothing to make: a tenant's rows appear as they are written."""

    def drop(self, name: str) -> None:
        """Nothing to remove from the schema; the tenant's rows stay until deleted."""

    def migrate(self, name: str) -> None:
        """Nothing per tenant: all tenants share the tables."""

    def describe(self, name: str) -> dict[str, str]:
        """All tenants share the tables: nothing to add."""
        return {}


def scope_orm_execute(state: ORMExecuteState) -> None:
    """Filter an ORM statement to the current tenant, or refuse it with no tenant."""
    if not (state.is_select or state.is_update or state.is_delete or state.is_insert):
        return
    tenant = _filter_tenant()
    if tenant is None:
        if state.is_select and _loads_scoped_entity(state):
            state.update_execution_options(identity_token=UNSCOPED_TOKEN)
        return
    if state.is_insert or (state.is_update and state.parameters):
        _scope_bulk_parameters(state, tenant)
    if state.is_insert:
        return
    state.statement = state.statement.options(_tenant_criteria(tenant))
    if state.is_select and _loads_scoped_entity(state):
        state.update_execution_options(identity_token=tenant)


def check_flush(session: Session, flush_context: UOWTransaction, instances: object) -> None:
    """Give new objects the current tenant; refuse writes that would cross tenants."""
    new = [obj for obj in session.new if isinstance(obj, TenantScoped)]
    changed = [obj for obj in session.dirty if isinstance(obj, TenantScoped)]
    deleted = [obj for obj in session.deleted if isinstance(obj, TenantScoped)]
    if not (new or changed or deleted):
        return
    tenant = _filter_tenant("Saving a tenant-scoped object")
    for obj in new:
        _assign_tenant(obj, tenant)
    for obj in changed:
        _check_unchanged(obj)
    if tenant is not None:
        for obj in changed:
            _check_owner(obj, tenant, "Updating")
        for obj in deleted:
            _check_owner(obj, tenant, "Deleting")


def _filter_tenant(action: str = "Querying a tenant-scoped model") -> str | None:
    """The tenant to filter by; ``None`` means no filter (or raises with none required)."""
    if context.is_unscoped():
        return None
    tenant = context.get_tenant()
    if tenant is None and current_settings().require_tenant:
        raise NoTenantError(action)
    return tenant


@lru_cache(maxsize=4096)
def _tenant_criteria(tenant: str) -> LoaderCriteriaOption:
    """The loader option filtering every ``TenantScoped`` entity to ``tenant``.

    Built once per tenant; the lambda turns ``tenant`` into a bound parameter, so
    all tenants share one compiled statement.
    """
    return with_loader_criteria(
        TenantScoped,
        lambda cls: cls.tenant_id == tenant,
        include_aliases=True,
        propagate_to_loaders=False,
    )


def _loads_scoped_entity(state: ORMExecuteState) -> bool:
    """Whether the statement returns ``TenantScoped`` objects (which then get a token)."""
    return any(issubclass(m.class_, TenantScoped) for m in state.all_mappers)


def _scope_bulk_parameters(state: ORMExecuteState, tenant: str) -> None:
    """Fill ``tenant_id`` into ORM bulk INSERT rows; refuse rows naming another tenant."""
    mapper = state.bind_mapper
    if mapper is None or not issubclass(mapper.class_, TenantScoped):
        return
    params = state.parameters
    rows: list[t.Mapping[str, t.Any]] = (
        list(params) if isinstance(params, list) else [params] if params else []  # type: ignore[list-item]
    )
    for row in rows:
        given = row.get("tenant_id")
        if given is not None and given != tenant:
            raise TenantMismatchError(given, tenant, f"A bulk {mapper.class_.__name__} row")
    if state.is_insert:
        state.parameters = [{**row, "tenant_id": tenant} for row in rows] or None
        if not rows:
            state.statement = t.cast(sa.Insert, state.statement).values(tenant_id=tenant)


def _assign_tenant(obj: TenantScoped, tenant: str | None) -> None:
    """Fill ``tenant_id`` (from the filter tenant, else any current one) and key it by tenant."""
    given = obj.tenant_id
    if given is None:
        given = tenant or context.get_tenant()
        if given is None:
            raise NoTenantError(f"Saving a new {type(obj).__name__} without a 'tenant_id'")
        obj.tenant_id = given
    elif tenant is not None and given != tenant:
        raise TenantMismatchError(given, tenant, f"The new {type(obj).__name__}")
    sa.inspect(obj).identity_token = given


def _check_unchanged(obj: TenantScoped) -> None:
    history = sa.inspect(obj).attrs.tenant_id.history
    if history.deleted and history.deleted[0] is not None:
        raise TenantImmutableError(history.deleted[0], obj.tenant_id, type(obj).__name__)


def _check_owner(obj: TenantScoped, tenant: str | None, action: str) -> None:
    if obj.tenant_id != tenant:
        raise TenantMismatchError(
            obj.tenant_id, tenant, f"{action} {type(obj).__name__} {sa.inspect(obj).identity}"
        )
