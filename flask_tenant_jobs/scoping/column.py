"""Column strategy: every tenant's rows in shared tables, told apart by ``tenant_id``.

``TenantScoped`` adds the column; the session hooks do the rest:

* ``do_orm_execute`` adds ``tenant_id = <current>`` to every ORM SELECT,
  UPDATE and DELETE (joins, aliases and relationship loads included), fills
  and checks ``tenant_id`` in ORM INSERTs, refuses ORM UPDATEs that would move
  rows to another tenant or reach another tenant's rows by primary key, and
  loads objects under an identity token naming the tenant;
* the session class looks objects up in the identity map under the same
  token, so after a switch ``session.get()`` and many-to-one loads never hand
  back an object (or a shared object's collection) loaded for another tenant;
* ``before_flush`` assigns ``tenant_id`` to new objects and refuses writes to
  objects of another tenant.

With no current tenant (and ``TENANT_JOBS_REQUIRE_TENANT`` on), a statement
that reaches a ``TenantScoped`` table raises ``NoTenantError``; statements on
shared models only run as usual.
"""

from __future__ import annotations

import typing as t
from contextlib import suppress
from weakref import WeakKeyDictionary

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.orm import (
    Mapped,
    Mapper,
    ORMExecuteState,
    Session,
    UOWTransaction,
    mapped_column,
    with_loader_criteria,
)

from .. import context
from ..errors import (
    RELOAD_HINT,
    NoTenantError,
    TenantError,
    TenantImmutableError,
    TenantMismatchError,
)
from ..settings import current_settings

#: Identity token of objects loaded while no tenant filter applies (``without_tenant``,
#: or no tenant with ``TENANT_JOBS_REQUIRE_TENANT`` off). It is not a valid tenant
#: name, so such objects never answer a tenant's lookups.
UNSCOPED_TOKEN = "*"

#: How many primary keys one bulk UPDATE ownership check looks up at a time.
_PK_CHUNK = 500


class TenantScoped:
    """Mixin for models whose rows belong to one tenant (column strategy).

    Adds an indexed, non-null ``tenant_id`` column; queries are filtered to the
    current tenant and new objects take its name on flush.
    """

    tenant_id: Mapped[str] = mapped_column(
        sa.String(63), index=True, nullable=False, active_history=True
    )


class TenantSession(Session):
    """Mixed into the session class of ``db``: identity-map lookups use the tenant's token.

    ``Session.get()`` and many-to-one lazy loads consult the identity map before
    any SQL runs; the token makes them see only objects loaded for the current
    tenant (``Session._identity_lookup`` is SQLAlchemy's documented hook for
    this, as used by its horizontal sharding extension).
    """

    def get(self, entity: t.Any, ident: t.Any, **kwargs: t.Any) -> t.Any:
        """``Session.get()``; a ``TenantScoped`` entity's query is built already filtered,
        under the tenant's identity token, so the execute hook has nothing to add."""
        if isinstance(entity, type) and issubclass(entity, TenantScoped):
            kwargs["options"] = (*(kwargs.get("options") or ()), TENANT_CRITERIA)
            if kwargs.get("identity_token") is None:
                kwargs["identity_token"] = _filter_tenant() or UNSCOPED_TOKEN
        return super().get(entity, ident, **kwargs)

    def _identity_lookup(  # type: ignore[override]
        self,
        mapper: Mapper[t.Any],
        primary_key_identity: t.Any,
        identity_token: t.Any = None,
        **kwargs: t.Any,
    ) -> t.Any:
        if identity_token is None:
            if _is_scoped(mapper):
                identity_token = _filter_tenant() or UNSCOPED_TOKEN
            else:
                identity_token = _shared_token()
        return super()._identity_lookup(
            mapper, primary_key_identity, identity_token=identity_token, **kwargs
        )


class ColumnStrategy:
    """Scopes ``TenantScoped`` models by their ``tenant_id`` column."""

    def install(self, app: Flask, db: SQLAlchemy) -> None:
        """Hook into ``db.session``'s session class (once per ``db``) and ``app``'s engines."""
        factory = db.session.session_factory
        if not issubclass(factory.class_, TenantSession):
            factory.class_ = type(factory.class_.__name__, (TenantSession, factory.class_), {})
        if not event.contains(db.session, "do_orm_execute", scope_orm_execute):
            event.listen(db.session, "do_orm_execute", scope_orm_execute)
            event.listen(db.session, "before_flush", check_flush)
        with app.app_context():
            for engine in db.engines.values():
                if not event.contains(engine, "handle_error", unwrap_tenant_errors):
                    event.listen(engine, "handle_error", unwrap_tenant_errors)

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
    tenant = context.get_tenant()
    if context.is_unscoped() or (tenant is None and not current_settings().require_tenant):
        state.statement = _unfiltered(state.statement)
        if state.is_select and _names_scoped_entity(state):
            state.update_execution_options(identity_token=UNSCOPED_TOKEN)
        return
    if tenant is None:
        if _names_scoped_entity(state):
            raise NoTenantError("Querying a tenant-scoped model")
        state.statement = _filtered(state.statement)  # reaching tenant rows raises then
        return
    if state.is_select:
        if state.is_column_load:
            _check_refresh(state, tenant)
        if not _prepared_by_get(state, tenant):
            state.statement = _filtered_for(state.statement, tenant)
        return
    mapper = state.bind_mapper
    if mapper is not None and _is_scoped(mapper):
        if state.is_insert:
            _scope_insert(state, mapper, tenant)
            return
        if state.is_update:
            _check_update(state, mapper, tenant)
    state.statement = _filtered(state.statement)


def unwrap_tenant_errors(error_context: sa.engine.ExceptionContext) -> BaseException | None:
    """Raise a tenant error met while executing as itself, not wrapped by SQLAlchemy."""
    if isinstance(error_context.original_exception, TenantError):
        return error_context.original_exception
    return None


def check_flush(session: Session, flush_context: UOWTransaction, instances: object) -> None:
    """Give new objects the current tenant; refuse writes that would cross tenants."""
    new = [obj for obj in session.new if isinstance(obj, TenantScoped)]
    changed = [obj for obj in session.dirty if isinstance(obj, TenantScoped)]
    deleted = [obj for obj in session.deleted if isinstance(obj, TenantScoped)]
    shared_token = _shared_token()
    if shared_token is not None:  # new shared objects: keyed like this tenant's loads
        for obj in session.new:
            if not isinstance(obj, TenantScoped):
                sa.inspect(obj).identity_token = shared_token
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


def _is_scoped(mapper: Mapper[t.Any]) -> bool:
    return issubclass(mapper.class_, TenantScoped)


def _filter_tenant(action: str = "Querying a tenant-scoped model") -> str | None:
    """The tenant to filter by; ``None`` means no filter (or raises with none required)."""
    if context.is_unscoped():
        return None
    tenant = context.get_tenant()
    if tenant is None and current_settings().require_tenant:
        raise NoTenantError(action)
    return tenant


def _shared_token() -> str | None:
    """The identity token of shared objects loaded now: the filter tenant, if any.

    Shared objects are keyed by tenant too, so that a collection of tenant rows
    loaded on one (``plan.orders``) is never handed to another tenant.
    """
    return None if context.is_unscoped() else context.get_tenant()


def _criteria_tenant() -> str:
    """The tenant a filtered statement is bound to, read as it executes.

    Raising here refuses, with no tenant, every statement that reaches tenant rows,
    however indirectly (a join, a subquery, an eager or lazy load);
    ``unwrap_tenant_errors`` hands the error to the caller unwrapped.
    """
    tenant = context.get_tenant()
    if tenant is None:
        raise NoTenantError("Querying a tenant-scoped model")
    return tenant


#: The current tenant as a bound parameter, read each time a statement executes.
CURRENT_TENANT = sa.bindparam(
    "tenant_jobs_tenant", callable_=_criteria_tenant, type_=sa.String(), unique=False
)

#: Filters every ``TenantScoped`` entity (joins, aliases, eager and lazy loads) to
#: the current tenant. One option serves every tenant, since the tenant is a
#: parameter: scoped statements, their cache keys and compiled forms are shared,
#: and criteria a lazy load inherits from its parent's query read the tenant
#: current when it runs, never the parent's.
TENANT_CRITERIA = with_loader_criteria(
    TenantScoped,
    lambda cls: cls.tenant_id == CURRENT_TENANT,
    include_aliases=True,
    track_closure_variables=False,
)


_filtered_statements: WeakKeyDictionary[t.Any, t.Any] = WeakKeyDictionary()


def _filtered(statement: t.Any) -> t.Any:
    """``statement`` with the tenant criteria, worked out once per statement object.

    Reused statements (relationship loaders, statements kept by the application)
    are thus filtered once, not at every execution.
    """
    with suppress(KeyError, TypeError):
        return _filtered_statements[statement]
    filtered = _with_criteria(statement)
    with suppress(TypeError):  # a statement that cannot be weakly referenced is not kept
        _filtered_statements[statement] = filtered
    return filtered


def _with_criteria(statement: t.Any) -> t.Any:
    """``statement`` with the tenant criteria (it may have them from ``get()`` or its parent)."""
    if TENANT_CRITERIA in statement._with_options:
        return statement
    return statement.options(TENANT_CRITERIA)


#: Per statement, its filtered SELECT for each recent tenant (bounded, see below).
_selects_by_tenant: WeakKeyDictionary[t.Any, dict[str, t.Any]] = WeakKeyDictionary()
_TENANTS_PER_STATEMENT = 64


def _filtered_for(statement: t.Any, tenant: str) -> t.Any:
    """A filtered SELECT that loads objects under ``tenant``'s identity token.

    The token rides on the statement's execution options, so a statement reused
    in the same tenant (relationship loaders, kept statements) costs a lookup.
    """
    with suppress(KeyError, TypeError):
        return _selects_by_tenant[statement][tenant]
    selected = _with_criteria(statement).execution_options(identity_token=tenant)
    with suppress(TypeError):  # a statement that cannot be weakly referenced is not kept
        per_tenant = _selects_by_tenant.setdefault(statement, {})
        if len(per_tenant) >= _TENANTS_PER_STATEMENT:
            per_tenant.clear()
        per_tenant[tenant] = selected
    return selected


def _prepared_by_get(state: ORMExecuteState, tenant: str) -> bool:
    """Whether ``TenantSession.get()`` built this load filtered and under ``tenant``'s token."""
    return (
        state.load_options._identity_token == tenant
        and TENANT_CRITERIA in state.statement._with_options
    )


def _unfiltered(statement: t.Any) -> t.Any:
    """``statement`` without the tenant criteria a relationship load or ``get()`` gave it."""
    options = statement._with_options
    if TENANT_CRITERIA not in options:
        return statement
    unfiltered = statement._generate()
    unfiltered._with_options = tuple(o for o in options if o is not TENANT_CRITERIA)
    return unfiltered


def _names_scoped_entity(state: ORMExecuteState) -> bool:
    """Whether the statement's subject (what it returns or changes) is ``TenantScoped``."""
    return any(_is_scoped(mapper) for mapper in state.all_mappers)


def _check_refresh(state: ORMExecuteState, tenant: str) -> None:
    """Refuse to reload expired attributes of an object loaded for another tenant.

    SQLAlchemy never applies loader criteria to such refreshes (they load by
    primary key), so an object kept across a switch would read the other
    tenant's row.
    """
    refreshing = state.load_options._refresh_state
    if refreshing is None or not _is_scoped(refreshing.mapper):
        return
    owner = refreshing.identity_token
    if owner not in (tenant, None, UNSCOPED_TOKEN):
        raise TenantMismatchError(
            owner,
            tenant,
            f"Loading {refreshing.class_.__name__} {refreshing.identity}",
            RELOAD_HINT,
        )


def _given_tenant(values: t.Mapping[t.Any, t.Any]) -> tuple[bool, t.Any]:
    """Whether a row of statement values names ``tenant_id``, and the value it gives."""
    for key, value in values.items():
        if (key if isinstance(key, str) else getattr(key, "key", None)) == "tenant_id":
            return True, getattr(value, "value", value)
    return False, None


def _param_rows(params: t.Any) -> list[dict[str, t.Any]]:
    """The parameter rows of an executemany (a list of dicts) or of one execution (a dict)."""
    return [dict(row) for row in params] if isinstance(params, list) else [dict(params)]


def _check_rows(rows: t.Iterable[t.Mapping[t.Any, t.Any]], tenant: str, what: str) -> None:
    """Refuse rows that name a tenant other than ``tenant``."""
    for row in rows:
        named, given = _given_tenant(row)
        if named and given != tenant:
            raise TenantMismatchError(given, tenant, what)


def _scope_insert(state: ORMExecuteState, mapper: Mapper[t.Any], tenant: str) -> None:
    """Fill ``tenant_id`` into an ORM INSERT; refuse rows naming another tenant."""
    what = f"A new {mapper.class_.__name__} row"
    statement: t.Any = state.statement
    if state.parameters:
        rows = _param_rows(state.parameters)
        _check_rows(rows, tenant, what)
        state.parameters = [{**row, "tenant_id": tenant} for row in rows]
        return
    if statement._multi_values:
        multi = [list(rows) for rows in statement._multi_values]
        for rows in multi:
            _check_rows(rows, tenant, what)
        statement = statement._generate()
        statement._multi_values = tuple(
            [{**row, "tenant_id": tenant} for row in rows] for rows in multi
        )
        state.statement = statement
        return
    _check_rows([statement._values or {}], tenant, what)
    state.statement = statement.values(tenant_id=tenant)


def _check_update(state: ORMExecuteState, mapper: Mapper[t.Any], tenant: str) -> None:
    """Refuse an ORM UPDATE that moves rows or names another tenant's primary keys.

    ``update(Model).values(tenant_id=...)`` would move the current tenant's rows;
    a bulk UPDATE by primary key (a list of parameter dicts) runs one UPDATE per
    row that the tenant criteria never reach, so the rows' owners are checked first.
    """
    statement = t.cast(sa.Update, state.statement)
    named, given = _given_tenant(statement._values or {})
    if named and given != tenant:
        raise TenantImmutableError(
            tenant, given, f"Each {mapper.class_.__name__} row this UPDATE reaches"
        )
    if not state.parameters:
        return
    rows = _param_rows(state.parameters)
    what = f"A bulk {mapper.class_.__name__} row"
    _check_rows(rows, tenant, what)
    keys = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
    idents = {tuple(row.get(key) for key in keys) for row in rows}
    idents.discard(tuple(None for _ in keys))
    owners = _owners(state.session, mapper, idents)
    for ident in sorted(idents, key=repr):
        owner = owners.get(ident, tenant)  # a missing row is SQLAlchemy's to report
        if owner != tenant:
            raise TenantMismatchError(owner, tenant, f"{what} with primary key {ident!r}")


def _owners(
    session: Session, mapper: Mapper[t.Any], idents: t.Collection[tuple[t.Any, ...]]
) -> dict[tuple[t.Any, ...], str]:
    """The tenant of each existing row among ``idents``, read without any filter.

    Unscoped also for row-level security, which would hide another tenant's rows.
    """
    columns = list(mapper.primary_key)
    key = sa.tuple_(*columns) if len(columns) > 1 else columns[0]
    connection = session.connection(bind_arguments={"mapper": mapper})
    pending = list(idents)
    owners: dict[tuple[t.Any, ...], str] = {}
    for start in range(0, len(pending), _PK_CHUNK):
        chunk = pending[start : start + _PK_CHUNK]
        wanted = chunk if len(columns) > 1 else [ident[0] for ident in chunk]
        query = (
            sa.select(*columns, mapper.columns["tenant_id"])
            .select_from(mapper.persist_selectable)
            .where(key.in_(wanted))
        )
        with context.unscoped():
            rows = connection.execute(query).all()
        for row in rows:
            owners[tuple(row[: len(columns)])] = row[-1]
    return owners


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


def _owner(obj: TenantScoped) -> str:
    """The tenant a persistent object belongs to, without a filtered (and failing) refresh."""
    state = sa.inspect(obj)
    if state.identity_token not in (None, UNSCOPED_TOKEN):
        return t.cast(str, state.identity_token)
    return obj.tenant_id  # loaded without a tenant: its own column says


def _check_owner(obj: TenantScoped, tenant: str | None, action: str) -> None:
    owner = _owner(obj)
    if owner != tenant:
        raise TenantMismatchError(
            owner, tenant, f"{action} {type(obj).__name__} {sa.inspect(obj).identity}"
        )
