"""Column strategy: every tenant's rows in shared tables, told apart by ``tenant_id``.

``TenantScoped`` adds the column; the session hooks do the rest:

* ``do_orm_execute`` adds ``tenant_id = <current>`` to every ORM SELECT,
  UPDATE and DELETE (joins, aliases, relationship loads, unscoped base classes
  of scoped subclasses and ``with_expression()`` included), fills and checks
  ``tenant_id`` in ORM INSERTs and upserts, refuses ORM UPDATEs that would move
  rows to another tenant or reach another tenant's rows by primary key, and
  loads objects under an identity token naming the tenant;
* the session class looks objects up in the identity map under the same
  token, so after a switch ``session.get()`` and many-to-one loads never hand
  back an object (or a shared object's collection) loaded for another tenant,
  and scopes the legacy bulk methods, which fire no event;
* ``before_flush`` assigns ``tenant_id`` to new objects (the tenant current when
  they were added) and refuses writes to objects of another tenant.

With no current tenant (and ``TENANT_JOBS_REQUIRE_TENANT`` on), a statement
that reaches a ``TenantScoped`` table raises ``NoTenantError``; statements on
shared models only run as usual. See docs/column-strategy.md for every path.
"""

from __future__ import annotations

import typing as t
from collections import defaultdict
from contextlib import suppress
from weakref import WeakKeyDictionary

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm.state import InstanceState

from .. import context
from ..errors import (
    RELOAD_HINT,
    NoTenantError,
    TenantError,
    TenantImmutableError,
    TenantMismatchError,
)
from . import _sqla
from .criteria import (
    REGISTRY,
    TENANT_CRITERIA,
    UNSCOPED_TOKEN,
    TenantScoped,
    base_criteria,
    is_scoped_model,
    key_load,
)
from .hooks import listen_once
from .offboarding import delete_tenant_rows
from .statements import (
    check_rows,
    param_rows,
    refuse_nested_scoped_dml,
    scope_insert,
    scope_query_expressions,
)
from .statements import given_tenant as _given_tenant
from .tenancy import filter_tenant, scoping_tenant, tenant_is_missing

__all__ = ["UNSCOPED_TOKEN", "ColumnStrategy", "TenantScoped", "TenantSession"]

#: How many primary keys one bulk UPDATE ownership check looks up at a time.
_PK_CHUNK = 500

#: Where ``InstanceState.info`` keeps the tenant current when an object was added.
_ADDED_IN = "flask_tenant_jobs.added_in"

#: The execution option naming the tenant a kept filtered SELECT loads for; the loads
#: that follow its rows (``selectinload``, ``subqueryload``) inherit it.
_LOADED_IN = "flask_tenant_jobs_loaded_in"


class TenantSession(_sqla.TokenChoosingSession):
    """Mixed into the session class of ``db``: identity-map lookups use the tenant's token.

    ``Session.get()`` and many-to-one lazy loads consult the identity map before
    any SQL runs; the token makes them see only objects loaded for the current
    tenant. The legacy bulk methods fire no ORM event, so they are scoped here.
    """

    unwrapped_errors = (TenantError,)

    def get(self, entity: t.Any, ident: t.Any, **kwargs: t.Any) -> t.Any:
        """``Session.get()``; a ``TenantScoped`` entity is loaded already filtered, under
        the tenant's identity token, so the execute hook has nothing to add.

        An ``identity_token`` naming another tenant is refused. A model whose load
        reads its one table, asked for with no other argument, is loaded by a kept
        SELECT by primary key and ``tenant_id`` past the execute hook (where nothing
        else listens); any other load gets the loader criteria."""
        if not (isinstance(entity, type) and is_scoped_model(entity)):
            return super().get(entity, ident, **kwargs)
        tenant = filter_tenant()
        kwargs["identity_token"] = _checked_token(
            entity.__name__, kwargs.get("identity_token"), tenant or UNSCOPED_TOKEN
        )
        if tenant is not None and _only_the_key_given(kwargs):
            load = key_load(entity) if self._only_scoping_listens() else None
            if load is not None:
                token = kwargs["identity_token"]
                return self.get_by_statement(
                    entity, ident, token, lambda key: load.for_key(key, tenant)
                )
        kwargs["options"] = (*(kwargs.get("options") or ()), TENANT_CRITERIA)
        return super().get(entity, ident, **kwargs)

    def _execute_internal(self, statement: t.Any, params: t.Any = None, **kwargs: t.Any) -> t.Any:
        """Every ORM execution; a SELECT the hook would only filter (an ORM ``select()``
        with no options of its own, or one filtered in this tenant before), executed with
        no options, runs filtered under the tenant's token without the hook.

        The tenant rides on the statement (:data:`_LOADED_IN`): the loads that follow
        a SELECT's rows (``selectinload``, ``subqueryload``, which may run once the
        tenant has changed) inherit it, and the hook refuses them in another tenant.
        The token is given as the ORM's load options, made once per tenant.
        """
        if (
            kwargs.get("_parent_execute_state") is None
            and not kwargs.get("_add_event")
            and not kwargs.get("execution_options")
            and not self.execution_options
        ):
            tenant = scoping_tenant()
            filtered = None
            if tenant is not None and self._only_scoping_listens():
                filtered = _filtered_in_advance(statement, tenant)
            if filtered is not None:
                statement = filtered
                kwargs["execution_options"] = _sqla.loading_under_token(tenant)
                kwargs["_parent_execute_state"] = _sqla.NO_MORE_LISTENERS
        return super()._execute_internal(statement, params, **kwargs)

    def _only_scoping_listens(self) -> bool:
        """Whether the scoping hook is the only ``do_orm_execute`` listener: then a
        statement filtered in advance may skip it, as nothing else would see it."""
        return self.only_execute_listener_is(scope_orm_execute)

    def lookup_token(
        self, mapper: t.Any, given: t.Any, lazy_loaded_from: InstanceState[t.Any] | None
    ) -> t.Any:
        """The current tenant's token; another tenant's (given, or a lazy load's parent's)
        is refused."""
        if lazy_loaded_from is not None:
            check_loaded_in_this_tenant(lazy_loaded_from)
        scoped = is_scoped_model(mapper.class_)
        expected = (filter_tenant() or UNSCOPED_TOKEN) if scoped else _shared_token()
        return _checked_token(mapper.class_.__name__, given, expected)

    def bulk_insert_mappings(
        self, mapper: t.Any, mappings: t.Iterable[dict[str, t.Any]], *args: t.Any, **kw: t.Any
    ) -> None:
        """``Session.bulk_insert_mappings()``; a scoped model's rows get the current tenant.

        The rows are given ``tenant_id`` in place, as SQLAlchemy itself fills their
        primary keys in place with ``return_defaults``.
        """
        rows = list(mappings)
        target = sa.inspect(mapper)
        if is_scoped_model(target.class_):
            what = f"A new {target.class_.__name__} row"
            tenant = filter_tenant(f"Bulk-inserting {target.class_.__name__} rows")
            if tenant is not None:
                check_rows(rows, tenant, what)
            for row in rows:
                row["tenant_id"] = tenant or _required_tenant_of(row, what)
        super().bulk_insert_mappings(mapper, rows, *args, **kw)

    def bulk_update_mappings(
        self, mapper: t.Any, mappings: t.Iterable[dict[str, t.Any]]
    ) -> None:
        """``Session.bulk_update_mappings()``; refused for rows of another tenant."""
        rows = list(mappings)
        target = sa.inspect(mapper)
        if is_scoped_model(target.class_) or base_criteria(target) is not None:
            tenant = filter_tenant(f"Bulk-updating {target.class_.__name__} rows")
            if tenant is not None:
                check_rows_by_key(self, target, rows, tenant)
        super().bulk_update_mappings(mapper, rows)

    def bulk_save_objects(self, objects: t.Iterable[object], *args: t.Any, **kw: t.Any) -> None:
        """``Session.bulk_save_objects()``, checked like a flush of the same objects."""
        objs = list(objects)
        scoped = _scoped_objects(objs)
        if scoped:
            tenant = filter_tenant("Bulk-saving tenant-scoped objects")
            new = [obj for obj in scoped if sa.inspect(obj).key is None]
            for obj in new:
                _assign_tenant(obj, tenant)
            existing = [obj for obj in scoped if sa.inspect(obj).key is not None]
            for obj in existing:
                _check_unchanged(obj)
            if tenant is not None:
                check_owners(self, existing, tenant, "Updating")
        super().bulk_save_objects(objs, *args, **kw)


def _only_the_key_given(get_kwargs: dict[str, t.Any]) -> bool:
    """Whether ``get()`` was given nothing but the key and the token: every other argument
    is empty (``db.session``, a scoped session, passes each one on, mostly ``None``)."""
    return not any(value for name, value in get_kwargs.items() if name != "identity_token")


def _checked_token(name: str, given: t.Any, expected: t.Any) -> t.Any:
    """``expected``, unless the caller gave another tenant's identity token."""
    if given is None or given == expected:
        return expected
    raise TenantMismatchError(
        given,
        None if expected in (None, UNSCOPED_TOKEN) else expected,
        f"A {name} looked up with identity_token={given!r}",
        "leave 'identity_token' out: the session looks up the current tenant's objects.",
    )


class ColumnStrategy:
    """Scopes ``TenantScoped`` models by their ``tenant_id`` column."""

    def __init__(self, db: SQLAlchemy) -> None:
        self.db = db

    def install(self, app: Flask, db: SQLAlchemy) -> None:
        """Hook into ``db.session``'s session class (once per ``db``) and ``app``'s engines."""
        factory = db.session.session_factory
        if not issubclass(factory.class_, TenantSession):
            factory.class_ = type(factory.class_.__name__, (TenantSession, factory.class_), {})
        listen_once(db.session, "do_orm_execute", scope_orm_execute)
        listen_once(db.session, "before_flush", check_flush)
        listen_once(db.session, "transient_to_pending", note_tenant_added_in)
        with app.app_context():
            for engine in db.engines.values():
                listen_to_executions(engine)

    def check_tenant(self, name: str) -> None:
        """Any known tenant can be entered: its rows simply share the tables."""

    def create(self, name: str) -> list[str]:
        """Nothing to make: a tenant's rows appear as they are written."""
        return []

    def drop(self, name: str) -> dict[str, int]:
        """Delete the tenant's rows from every ``TenantScoped`` table, in one transaction."""
        return delete_tenant_rows(self.db, name)

    def migrate(self, name: str) -> None:
        """Nothing per tenant: all tenants share the tables."""

    def describe(self, name: str) -> dict[str, str]:
        """All tenants share the tables: nothing to add."""
        return {}

    def check_storage(self) -> list[str]:
        """All tenants share the tables: nothing to check per tenant."""
        return []


def scope_orm_execute(state: ORMExecuteState) -> None:
    """Filter an ORM statement to the current tenant, or refuse it with no tenant."""
    if not (state.is_select or state.is_update or state.is_delete or state.is_insert):
        if state.is_from_statement:
            _key_textual_load(state)
        return
    tenant = scoping_tenant()
    if tenant is not None:
        _scope_to_tenant(state, tenant)
    elif tenant_is_missing():
        _scope_without_tenant(state)
    else:
        _leave_unfiltered(state)


def _scope_to_tenant(state: ORMExecuteState, tenant: str) -> None:
    """Filter a statement to ``tenant``: SELECTs, and ORM INSERTs, UPDATEs and DELETEs."""
    if state.is_select:
        _scope_select(state, tenant)
        return
    mapper = state.bind_mapper
    if mapper is not None and is_scoped_model(mapper.class_):
        if state.is_insert:
            scope_insert(state, mapper, tenant)
            return
        if state.is_update:
            _check_update(state, mapper, tenant)
    elif mapper is not None and state.is_update and base_criteria(mapper) is not None:
        _check_bulk_update(state, mapper, tenant)
    _check_core_only(state)
    state.statement = _filtered(state.statement)


def _key_textual_load(state: ORMExecuteState) -> None:
    """Key the objects of a ``from_statement()`` of ``text()`` (or of DML) by the tenant now.

    Its SQL is the application's, which no criteria reach; its objects still belong to
    the tenant they were loaded in, so they are never handed to another tenant (by
    ``get()``) nor filled with another tenant's rows by a lazy load.
    """
    expected = _shared_token()
    if expected is not None:
        _checked_token("query", _given_identity_token(state), expected)
        state.update_execution_options(identity_token=expected)


def _scope_without_tenant(state: ORMExecuteState) -> None:
    """No tenant where one is required: refuse a statement on a scoped model; filter the rest,
    whose criteria raise ``NoTenantError`` as soon as they reach tenant rows."""
    if _names_scoped_entity(state):
        raise NoTenantError("Querying a tenant-scoped model")
    _check_core_only(state)
    state.statement = _filtered(state.statement)


def _leave_unfiltered(state: ORMExecuteState) -> None:
    """``without_tenant()``, or no tenant where none is required: no filter at all."""
    if state.is_select:
        _scope_unfiltered_select(state)
    else:
        state.statement = _unfiltered(state.statement)


def _scope_select(state: ORMExecuteState, tenant: str) -> None:
    """Filter a SELECT to ``tenant`` and key what it loads by ``tenant``."""
    token = _given_identity_token(state)
    if token is not None and token != tenant and not _prepared_by_get(state, tenant):
        _checked_token("query", token, tenant)
    if state.is_column_load:
        _check_refresh(state, tenant)
        _refresh_only_in_tenant(state, tenant)
    if state.lazy_loaded_from is not None:
        check_loaded_in_this_tenant(state.lazy_loaded_from)
    if not _prepared_by_get(state, tenant):
        state.statement = _filtered_for(state.statement, tenant)
        state.update_execution_options(identity_token=tenant)


def _scope_unfiltered_select(state: ORMExecuteState) -> None:
    """Without a filter, a SELECT loads under the unscoped token, never a tenant's."""
    token = _given_identity_token(state)
    unscoped = context.is_unscoped() or _names_scoped_entity(state)
    expected = UNSCOPED_TOKEN if unscoped else None
    if token not in (None, UNSCOPED_TOKEN):
        _checked_token("query", token, expected)
    if state.lazy_loaded_from is not None:
        check_loaded_in_this_tenant(state.lazy_loaded_from)
    state.statement = _unfiltered(state.statement)
    if expected is not None:
        state.update_execution_options(identity_token=expected)


def _given_identity_token(state: ORMExecuteState) -> t.Any:
    """The ``identity_token`` (or :data:`_LOADED_IN`) execution option given to the
    execution or the statement.

    Read from both dictionaries (``state.execution_options`` would merge them anew), and
    past an ``identity_token=None``, which would hide the tenant a follow-up load inherits.
    """
    for options in (state.local_execution_options, state.statement.get_execution_options()):
        for key in ("identity_token", _LOADED_IN):
            token = options.get(key)
            if token is not None:
                return token
    return None


def _check_core_only(state: ORMExecuteState) -> None:
    """Refuse ``dml_strategy="core_only"`` (no loader criteria) where tenant rows are reached."""
    if state.execution_options.get("dml_strategy") == "core_only" and not state.is_select:
        what = "This ORM UPDATE or DELETE with dml_strategy='core_only'"
        refuse_nested_scoped_dml(state.statement, what)


def listen_to_executions(engine: sa.Engine) -> None:
    """Check each statement ``engine`` runs for INSERTs nested in CTEs (once per engine).

    Through the dialect's ``do_execute`` events, first in line: connection events
    (``before_cursor_execute``) would make every execution dispatch all of them.
    """
    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        listen_once(engine, name, refuse_inserts_in_ctes, insert=True)


def refuse_inserts_in_ctes(cursor: t.Any, statement: str, *args: t.Any) -> None:
    """Refuse an INSERT into a tenant table nested in a CTE (PostgreSQL runs those).

    Only the outermost statement reaches the execute hook, so such an INSERT would
    keep any ``tenant_id`` it names. Read from the compiled statement (the execution
    context is the last argument), where SQLAlchemy lists the CTEs it rendered:
    nothing is walked for a statement without CTEs. Returns ``None``, so the
    statement then runs as usual.
    """
    ctes = getattr(getattr(args[-1], "compiled", None), "ctes", None)
    if not ctes or context.is_unscoped():
        return
    for cte in ctes:
        nested = getattr(cte, "element", None)
        table = getattr(nested, "table", None)
        if isinstance(nested, sa.Insert) and _sqla.plain_table(table) in REGISTRY.tenant_columns:
            raise TenantError(
                f"An INSERT into {nested.table.name} inside a CTE is not scoped to the tenant: "
                "run it as its own statement (session.execute(insert(Model).values(...)))."
            )


def note_tenant_added_in(session: Session, obj: object) -> None:
    """Remember the tenant current when an object is added, for its flush to check."""
    sa.inspect(obj).info[_ADDED_IN] = _shared_token()


def added_in(obj: object) -> str | None:
    """The tenant an object was added in, or ``None`` (no tenant, or ``without_tenant()``)."""
    token = sa.inspect(obj).info.get(_ADDED_IN)
    return None if token in (None, UNSCOPED_TOKEN) else t.cast(str, token)


def check_added_in(obj: object, tenant: str | None) -> None:
    """Refuse to flush, in ``tenant``, an object that was added while another tenant was current."""
    owner = added_in(obj)
    if owner is not None and tenant is not None and owner != tenant:
        raise TenantMismatchError(
            owner,
            tenant,
            f"The new {type(obj).__name__} (added while {owner!r} was current)",
            "commit or flush before switching tenants, or add it again in this tenant.",
        )


def check_flush(session: Session, flush_context: UOWTransaction, instances: object) -> None:
    """Give new objects the current tenant; refuse writes that would cross tenants."""
    _key_new_shared_objects(session)
    new, changed, deleted = map(_scoped_objects, (session.new, session.dirty, session.deleted))
    if not (new or changed or deleted):
        return
    tenant = filter_tenant("Saving a tenant-scoped object")
    _assign_new_objects(new, tenant)
    for obj in changed:
        _check_unchanged(obj)
    if tenant is not None:
        check_owners(session, changed, tenant, "Updating")
        check_owners(session, deleted, tenant, "Deleting")


def _scoped_objects(objs: t.Iterable[object]) -> list[TenantScoped]:
    """The objects of ``TenantScoped`` models among ``objs``."""
    return [t.cast(TenantScoped, obj) for obj in objs if is_scoped_model(type(obj))]


def _key_new_shared_objects(session: Session) -> None:
    """Key new shared objects like this tenant's loads (see ``_shared_token``)."""
    shared_token = _shared_token()
    if shared_token is not None:
        for obj in session.new:
            if not is_scoped_model(type(obj)):
                sa.inspect(obj).identity_token = shared_token


def _assign_new_objects(new: list[TenantScoped], tenant: str | None) -> None:
    """Give new objects their tenant, refusing those added while another tenant was current."""
    for obj in new:
        check_added_in(obj, tenant)
        _assign_tenant(obj, tenant)


def _shared_token() -> str | None:
    """The identity token of shared objects loaded now: the tenant, the unscoped token, or none.

    Shared objects are keyed by tenant too, so that a collection of tenant rows
    loaded on one (``plan.orders``) is never handed to another tenant.
    """
    return UNSCOPED_TOKEN if context.is_unscoped() else context.get_tenant()


def check_loaded_in_this_tenant(parent: InstanceState[t.Any]) -> None:
    """Refuse to lazy-load a relationship of an object loaded for another tenant.

    The load would be filtered to the current tenant and its rows kept on the
    object, which then hands them to the tenant it belongs to (a shared object's
    collection, or a scoped object's), or the other way round.
    """
    owner = t.cast("str | None", parent.identity_token)
    now = _shared_token()
    if owner is None and is_scoped_model(parent.mapper.class_):
        return  # never loaded through the hooks (a detached stub): its flush is checked
    if owner == now or (owner in (None, UNSCOPED_TOKEN) and now in (None, UNSCOPED_TOKEN)):
        return
    if now is None and context.get_tenant() is None:
        return  # no tenant: the load's criteria raise NoTenantError when they reach tenant rows
    raise TenantMismatchError(
        None if owner == UNSCOPED_TOKEN else owner,
        None if now == UNSCOPED_TOKEN else now,
        f"Lazy-loading a relationship of {parent.class_.__name__} {parent.identity}",
        RELOAD_HINT,
    )


_filtered_statements: WeakKeyDictionary[t.Any, tuple[int, t.Any]] = WeakKeyDictionary()


def _filtered(statement: t.Any) -> t.Any:
    """``statement`` with the tenant criteria, worked out once per statement object.

    Reused statements (relationship loaders, statements kept by the application)
    are thus filtered once, not at every execution.
    """
    with suppress(KeyError, TypeError):
        generation, filtered = _filtered_statements[statement]
        if generation == REGISTRY.generation:
            return filtered
    filtered = _with_criteria(statement)
    with suppress(TypeError):  # a statement that cannot be weakly referenced is not kept
        _filtered_statements[statement] = (REGISTRY.generation, filtered)
    return filtered


def _with_criteria(
    statement: t.Any, execution_options: t.Mapping[str, t.Any] | None = None
) -> t.Any:
    """``statement`` with the tenant criteria (it may have them from ``get()`` or its parent)
    and ``execution_options``, in one copy."""
    criteria = () if TENANT_CRITERIA in _sqla.options_of(statement) else REGISTRY.options
    if criteria or execution_options:
        statement = _sqla.with_added(statement, criteria, execution_options or {})
    if statement.is_select:
        statement = scope_query_expressions(statement, _entity_tables)
    return statement


def _entity_tables(statement: t.Any) -> set[t.Any]:
    """The tables of the entities a SELECT returns (those the criteria filter)."""
    tables = set()
    for description in statement.column_descriptions:
        entity = description.get("entity")
        if entity is not None:
            tables.update(sa.inspect(entity).mapper.tables)
    return tables


class _Kept:
    """A SELECT's filtered forms, each loading for one of its recent tenants."""

    __slots__ = ("by_tenant", "generation")

    def __init__(self) -> None:
        self.generation = REGISTRY.generation
        self.by_tenant: dict[str, t.Any] = {}


#: Per statement, what :func:`_filtered_for` made of it (tenants per statement bounded).
_kept_selects: WeakKeyDictionary[t.Any, _Kept] = WeakKeyDictionary()
_TENANTS_PER_STATEMENT = 64


def _filtered_for(statement: t.Any, tenant: str) -> t.Any:
    """A filtered SELECT marked as loading for ``tenant`` (:data:`_LOADED_IN`).

    Kept per statement and tenant, so a statement reused in the same tenant
    (relationship loaders, kept statements) costs a lookup.
    """
    return _selected_in(statement, _kept(statement) or _keep(statement), tenant)


def _selected_in(statement: t.Any, kept: _Kept, tenant: str) -> t.Any:
    """``statement`` filtered and marked as loading for ``tenant``, made once per tenant
    and kept in ``kept``."""
    selected = kept.by_tenant.get(tenant)
    if selected is None:
        if len(kept.by_tenant) >= _TENANTS_PER_STATEMENT:
            kept.by_tenant.clear()
        selected = _with_criteria(statement, _loading_options(statement, tenant))
        kept.by_tenant[tenant] = selected
    return selected


def _loading_options(statement: t.Any, tenant: str) -> dict[str, str]:
    """The execution options that mark ``statement``'s kept form as loading for ``tenant``;
    a statement naming an ``identity_token`` of its own (``None`` included: it would win over
    the load options the fast path gives) gets ``tenant``'s instead."""
    options = {_LOADED_IN: tenant}
    if "identity_token" in statement.get_execution_options():
        options["identity_token"] = tenant
    return options


def _filtered_in_advance(statement: t.Any, tenant: str) -> t.Any | None:
    """What the hook would make of ``statement`` in ``tenant``, where it would check
    nothing else of it: it was filtered in this tenant before, or it is an ORM
    ``select()`` that names no identity token and is no refresh or lazy load
    (``_scope_select``'s checks)."""
    kept = _kept(statement)
    selected = None if kept is None else kept.by_tenant.get(tenant)
    if selected is not None or not _sqla.is_plain_orm_select(statement):
        return selected
    return _selected_in(statement, kept or _keep(statement), tenant)


def _kept(statement: t.Any) -> _Kept | None:
    """What :func:`_filtered_for` kept of ``statement``, if made since the last scoped model
    was mapped."""
    try:  # get(), not []: most statements (built per call) are not kept, and cost no raise
        kept = _kept_selects.get(statement)
    except TypeError:  # a statement that cannot be weakly referenced is never kept
        return None
    return kept if kept is not None and kept.generation == REGISTRY.generation else None


def _keep(statement: t.Any) -> _Kept:
    """A new place for ``statement``'s filtered forms, kept for its next executions."""
    kept = _Kept()
    with suppress(TypeError):  # a statement that cannot be weakly referenced is not kept
        _kept_selects[statement] = kept
    return kept


def _prepared_by_get(state: ORMExecuteState, tenant: str) -> bool:
    """Whether ``TenantSession.get()`` built this load filtered and under ``tenant``'s token."""
    return (
        _sqla.load_identity_token(state) == tenant
        and TENANT_CRITERIA in _sqla.options_of(state.statement)
    )


def _unfiltered(statement: t.Any) -> t.Any:
    """``statement`` without the tenant criteria a relationship load or ``get()`` gave it."""
    options = _sqla.options_of(statement)
    if TENANT_CRITERIA not in options:
        return statement
    return _sqla.with_options_replaced(statement, (o for o in options if o is not TENANT_CRITERIA))


def _names_scoped_entity(state: ORMExecuteState) -> bool:
    """Whether the statement's subject (what it returns or changes) is ``TenantScoped``."""
    return any(is_scoped_model(mapper.class_) for mapper in state.all_mappers)


def _check_refresh(state: ORMExecuteState, tenant: str) -> None:
    """Refuse to reload expired attributes of an object loaded for another tenant.

    SQLAlchemy never applies loader criteria to such refreshes (they load by
    primary key), so an object kept across a switch would read the other
    tenant's row.
    """
    refreshing = _sqla.refreshed_state(state)
    if refreshing is None or not is_scoped_model(refreshing.mapper.class_):
        return
    owner = t.cast("str | None", refreshing.identity_token)
    if owner not in (tenant, None, UNSCOPED_TOKEN):
        raise TenantMismatchError(
            owner,
            tenant,
            f"Loading {refreshing.class_.__name__} {refreshing.identity}",
            RELOAD_HINT,
        )


def _refresh_only_in_tenant(state: ORMExecuteState, tenant: str) -> None:
    """Make a refresh of a one-table scoped object require its row to be ``tenant``'s.

    A row moved to another tenant by SQL the hooks never saw would otherwise be
    read into this tenant's object; now the object reads as deleted. Refreshes of
    inherited models select from the tables they need only, and are left as they are.
    """
    refreshing = _sqla.refreshed_state(state)
    if refreshing is None or not is_scoped_model(refreshing.mapper.class_):
        return
    load = key_load(refreshing.mapper.class_)
    if load is not None and isinstance(state.statement, sa.Select):
        state.statement = state.statement.where(load.tenant_column == tenant)


def _required_tenant_of(row: t.Mapping[str, t.Any], what: str) -> t.Any:
    """The ``tenant_id`` a row names where no tenant applies; it must name one."""
    if row.get("tenant_id") is None:
        raise NoTenantError(f"{what} without a 'tenant_id'")
    return row["tenant_id"]


def _check_update(state: ORMExecuteState, mapper: Mapper[t.Any], tenant: str) -> None:
    """Refuse an ORM UPDATE that moves rows or names another tenant's primary keys.

    ``update(Model).values(tenant_id=...)`` would move the current tenant's rows;
    a bulk UPDATE by primary key (a list of parameter dicts) runs one UPDATE per
    row that the tenant criteria never reach, so the rows' owners are checked first.
    """
    statement = t.cast(sa.Update, state.statement)
    for values in (_sqla.update_values(statement), dict(_sqla.update_ordered_values(statement))):
        named, given = _given_tenant(values)
        if named and getattr(given, "value", given) != tenant:
            raise TenantImmutableError(
                tenant, given, f"Each {mapper.class_.__name__} row this UPDATE reaches"
            )
    _check_bulk_update(state, mapper, tenant)


def _check_bulk_update(state: ORMExecuteState, mapper: Mapper[t.Any], tenant: str) -> None:
    """Refuse a bulk UPDATE by primary key that names rows of another tenant."""
    if state.parameters:
        check_rows_by_key(state.session, mapper, param_rows(state.parameters), tenant)


def check_rows_by_key(
    session: Session, mapper: Mapper[t.Any], rows: list[dict[str, t.Any]], tenant: str
) -> None:
    """Refuse rows (updates by primary key) that name, or belong to, another tenant."""
    what = f"A bulk {mapper.class_.__name__} row"
    check_rows(rows, tenant, what)
    keys = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
    idents = {tuple(row.get(key) for key in keys) for row in rows}
    idents.discard(tuple(None for _ in keys))
    owners = _owners(session, mapper, idents)
    for ident in sorted(idents, key=repr):
        owner = owners.get(ident)  # a missing row is SQLAlchemy's to report
        if owner is not None and owner != tenant:
            raise TenantMismatchError(owner, tenant, f"{what} with primary key {ident!r}")


def _tenant_columns(mapper: Mapper[t.Any]) -> list[sa.Column[t.Any]]:
    """The ``tenant_id`` columns that say who owns a row of ``mapper`` (several for a base)."""
    if is_scoped_model(mapper.class_):
        return [mapper.columns["tenant_id"]]
    return list(REGISTRY.mixed_bases.get(mapper, ()))


def _owners(
    session: Session, mapper: Mapper[t.Any], idents: t.Collection[tuple[t.Any, ...]]
) -> dict[tuple[t.Any, ...], str]:
    """The tenant of each existing row among ``idents``, read without any filter.

    Unscoped also for row-level security, which would hide another tenant's rows.
    """
    connection = session.connection(bind_arguments={"mapper": mapper})
    pending = list(idents)
    owners: dict[tuple[t.Any, ...], str] = {}
    for tenant_column in _tenant_columns(mapper):
        columns = list(tenant_column.table.primary_key.columns)
        key = sa.tuple_(*columns) if len(columns) > 1 else columns[0]
        for start in range(0, len(pending), _PK_CHUNK):
            chunk = pending[start : start + _PK_CHUNK]
            wanted = chunk if len(columns) > 1 else [ident[0] for ident in chunk]
            query = sa.select(*columns, tenant_column).where(key.in_(wanted))
            with context.unscoped():
                rows = connection.execute(query).all()
            for row in rows:
                if row[-1] is not None:
                    owners[tuple(row[: len(columns)])] = row[-1]
    return owners


def _assign_tenant(obj: TenantScoped, tenant: str | None) -> None:
    """Fill ``tenant_id`` (the filter tenant, else the one it was added in) and key it by tenant."""
    given = obj.tenant_id
    if given is None:
        given = tenant or added_in(obj) or context.get_tenant()
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


def check_owners(session: Session, objs: list[TenantScoped], tenant: str, action: str) -> None:
    """Refuse to write objects that belong to another tenant than ``tenant``.

    An object loaded through these hooks is keyed by its tenant. One that never
    was (``make_transient_to_detached()``, ``merge(load=False)``) says nothing
    trustworthy about itself: its row's owner is read from the database.
    """
    unknown: dict[Mapper[t.Any], list[TenantScoped]] = defaultdict(list)
    for obj in objs:
        state = sa.inspect(obj)
        owner = state.identity_token
        if owner is None:
            unknown[state.mapper].append(obj)
            continue
        if owner == UNSCOPED_TOKEN:
            owner = obj.tenant_id  # loaded without a filter: its own column says
        if owner != tenant:
            _refuse_owner(obj, owner, tenant, action)
    for mapper, stubs in unknown.items():
        keys = {sa.inspect(obj).identity: obj for obj in stubs}
        owners = _owners(session, mapper, list(keys))
        for ident, obj in keys.items():
            owner = owners.get(ident)
            if owner is not None and owner != tenant:
                _refuse_owner(obj, owner, tenant, action)


def _refuse_owner(obj: TenantScoped, owner: str | None, tenant: str, action: str) -> None:
    raise TenantMismatchError(
        owner, tenant, f"{action} {type(obj).__name__} {sa.inspect(obj).identity}"
    )
