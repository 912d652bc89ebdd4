"""The tenant filter: ``TenantScoped``, the criteria added to statements, and where they apply.

One loader-criteria option filters every ``TenantScoped`` entity; one more per
mapped base class that is not ``TenantScoped`` but has ``TenantScoped``
subclasses (single-table or joined-table inheritance), so that querying the base
never loads another tenant's subclass rows. Core expressions that the ORM's
criteria never reach (the expression of ``with_expression()``) are filtered by
:func:`scope_selects`.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Mapped, Mapper, mapped_column, with_loader_criteria
from sqlalchemy.sql import visitors

from .. import context
from ..errors import NoTenantError
from . import _sqla

#: Identity token of objects loaded while no tenant filter applies (``without_tenant``,
#: or no tenant with ``TENANT_JOBS_REQUIRE_TENANT`` off). It is not a valid tenant
#: name, so such objects never answer a tenant's lookups.
UNSCOPED_TOKEN = "*"


class TenantScoped:
    """Mixin for models whose rows belong to one tenant (column strategy).

    Adds an indexed, non-null ``tenant_id`` column; queries are filtered to the
    current tenant and new objects take its name on flush.
    """

    tenant_id: Mapped[str] = mapped_column(
        sa.String(63), index=True, nullable=False, active_history=True
    )


def is_scoped_model(cls: type) -> bool:
    """Whether ``cls`` is a ``TenantScoped`` model (else its rows are shared by all tenants)."""
    return issubclass(cls, TenantScoped)


def _criteria_tenant() -> str:
    """The tenant a filtered statement is bound to, read as it executes.

    Raising here refuses, with no tenant, every statement that reaches tenant rows,
    however indirectly (a join, a subquery, an eager or lazy load);
    the session (``TenantSession.unwrapped_errors``) raises it unwrapped.
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


class _Registry:
    """What the mapped classes tell about tenant rows, kept up to date as classes are mapped."""

    def __init__(self) -> None:
        #: table -> its ``tenant_id`` column, for every table holding ``TenantScoped`` rows
        self.tenant_columns: dict[sa.Table, sa.Column[t.Any]] = {}
        #: base mapper that is not scoped -> the tenant columns of its scoped subclasses
        self.mixed_bases: dict[Mapper[t.Any], list[sa.Column[t.Any]]] = {}
        #: every criteria option a filtered statement gets
        self.options: tuple[t.Any, ...] = (TENANT_CRITERIA,)
        #: how many times the options changed, so that caches of filtered statements reset
        self.generation = 0

    def add(self, mapper: Mapper[t.Any]) -> None:
        """Take note of a constructed ``TenantScoped`` mapper."""
        column = mapper.columns["tenant_id"]
        if isinstance(column.table, sa.Table):
            self.tenant_columns[column.table] = column
        parent = mapper.inherits
        if parent is None or is_scoped_model(parent.class_):
            return
        for base in parent.iterate_to_root():
            columns = self.mixed_bases.setdefault(base, [])
            if column not in columns:
                columns.append(column)
        self.options = (
            TENANT_CRITERIA,
            *(
                with_loader_criteria(base.class_, _base_criteria(base, cols), include_aliases=True)
                for base, cols in self.mixed_bases.items()
            ),
        )
        self.generation += 1


REGISTRY = _Registry()


@event.listens_for(Mapper, "after_mapper_constructed")
def _note_mapper(mapper: Mapper[t.Any], class_: type) -> None:
    """Take note of a scoped mapper as soon as it exists, not when mappers are configured:
    a statement can reach its table first (an INSERT inside a CTE configures nothing)."""
    if is_scoped_model(mapper.class_):
        _single_table_column_may_be_null(mapper)
        REGISTRY.add(mapper)


def _single_table_column_may_be_null(mapper: Mapper[t.Any]) -> None:
    """A scoped subclass sharing the table of an unscoped base: the base's rows have no tenant."""
    parent = mapper.inherits
    if mapper.single and parent is not None and not is_scoped_model(parent.class_):
        mapper.columns["tenant_id"].nullable = True


@event.listens_for(Mapper, "mapper_configured")
def _forget_key_loads(mapper: Mapper[t.Any], class_: type) -> None:
    _key_loads.clear()  # a new mapper may be a subclass of one looked at


#: Relationship loading strategies that load in the same SELECT or right after it.
_EAGER = frozenset({"joined", "subquery", "selectin", "immediate", False})
#: The parameter of a kept load by primary key that names the tenant.
_KEY_TENANT = "tenant_jobs_key_tenant"


class KeyLoad(t.NamedTuple):
    """A kept SELECT of one scoped model by primary key and tenant (see :func:`key_load`)."""

    model: type[t.Any]
    statement: sa.Select[t.Any]
    key_columns: tuple[sa.Column[t.Any], ...]
    tenant_column: sa.Column[t.Any]

    def for_key(self, ident: t.Sequence[t.Any], tenant: str) -> tuple[t.Any, dict[str, t.Any]]:
        """The SELECT and parameters that load primary key ``ident`` of ``tenant``.

        A key with a ``None`` in it compares that column with ``IS NULL``, as
        ``Session.get()`` does, in a statement of its own.
        """
        if None in ident:
            pairs = zip(self.key_columns, ident, strict=True)
            where = [c.is_(None) if v is None else c == v for c, v in pairs]
            return sa.select(self.model).where(*where, self.tenant_column == tenant), {}
        params = {f"tenant_jobs_key_{i}": value for i, value in enumerate(ident)}
        params[_KEY_TENANT] = tenant
        return self.statement, params


#: Per scoped model, its kept load by primary key, or ``None`` where that reads more.
_key_loads: dict[type, KeyLoad | None] = {}


def key_load(cls: type[TenantScoped]) -> KeyLoad | None:
    """The kept load by primary key and tenant of scoped model ``cls``, or ``None``.

    Enough, without the loader-criteria option, where such a load reads one table
    and nothing else: no inheritance, no eager relationship, only plain columns
    of that table (a ``column_property`` subquery would need the option). One
    statement per model, kept, is compiled and cache-keyed once; the tenant is
    one of its parameters. The WHERE names the table's own columns: ORM-annotated
    ones cost more at every execution.
    """
    try:
        return _key_loads[cls]
    except KeyError:
        pass
    mapper = sa.inspect(cls)
    load = None
    if _reads_one_table(mapper):
        keys = tuple(mapper.primary_key)
        tenant_column = mapper.tables[0].c["tenant_id"]
        where = [c == sa.bindparam(f"tenant_jobs_key_{i}") for i, c in enumerate(keys)]
        statement = sa.select(cls).where(*where, tenant_column == sa.bindparam(_KEY_TENANT))
        load = KeyLoad(cls, statement, keys, tenant_column)
    _key_loads[cls] = load
    return load


def _reads_one_table(mapper: Mapper[t.Any]) -> bool:
    """Whether a load of ``mapper`` reads its one table alone (see ``key_load``)."""
    if mapper.inherits is not None or len(mapper.self_and_descendants) != 1:
        return False
    if mapper.polymorphic_on is not None or len(mapper.tables) != 1:
        return False
    table = mapper.tables[0]
    plain = all(
        isinstance(column, sa.Column) and column.table is table
        for prop in mapper.column_attrs
        for column in prop.columns
    )
    return plain and not any(rel.lazy in _EAGER for rel in mapper.relationships)


def _base_criteria(base: Mapper[t.Any], columns: list[sa.Column[t.Any]]) -> t.Any:
    """Rows of ``base`` that are not scoped subclass rows of another tenant.

    Single-table: the subclass's ``tenant_id`` is in the base table (null for the
    base's own rows). Joined-table: it is in the subclass table, so the base's
    primary key must not be among those of another tenant's subclass rows.
    """
    pieces = []
    for column in columns:
        if column.table in base.tables:
            pieces.append(tenant_matches(column))
            continue
        owned = sa.select(*column.table.primary_key.columns).where(column != CURRENT_TENANT)
        key = list(base.primary_key)
        pieces.append((key[0] if len(key) == 1 else sa.tuple_(*key)).not_in(owned))
    return sa.and_(*pieces)


def base_criteria(mapper: Mapper[t.Any]) -> t.Any | None:
    """The criteria of an unscoped base with scoped subclasses, or ``None`` for other mappers."""
    columns = REGISTRY.mixed_bases.get(mapper)
    return None if columns is None else _base_criteria(mapper, columns)


def scoped_tables_in(element: t.Any) -> set[sa.Table]:
    """The tables holding tenant rows that ``element`` reaches anywhere (subqueries, CTEs)."""
    found = set()
    for node in visitors.iterate(element):
        table = _sqla.plain_table(node) if isinstance(node, sa.sql.FromClause) else None
        if table is not None and table in REGISTRY.tenant_columns:
            found.add(table)
    return found


def scope_selects(expression: t.Any) -> t.Any:
    """``expression`` with each SELECT in it filtered to the current tenant.

    For Core expressions that loader criteria never reach: every table (or alias
    of one) holding tenant rows in a SELECT's FROM gets ``tenant_id = <current>``.
    """

    def filter_select(select: t.Any) -> None:
        criteria = [
            tenant_matches(column)
            for from_ in select.get_final_froms()
            for column in _tenant_columns_of(from_)
        ]
        if criteria:
            _sqla.add_where(select, criteria)

    return visitors.cloned_traverse(expression, {}, {"select": filter_select})


def _tenant_columns_of(from_: t.Any) -> t.Iterator[t.Any]:
    """The ``tenant_id`` columns of the tenant tables (or aliases) that make up ``from_``."""
    if isinstance(from_, sa.sql.expression.Join):
        yield from _tenant_columns_of(from_.left)
        yield from _tenant_columns_of(from_.right)
        return
    table = _sqla.plain_table(from_)
    if isinstance(table, sa.sql.expression.Alias):
        table = _sqla.plain_table(table.element)
    column = REGISTRY.tenant_columns.get(table)
    if column is not None:
        yield from_.c[column.key]


def tenant_matches(column: t.Any, tenant: t.Any = CURRENT_TENANT) -> t.Any:
    """``column = <current tenant>`` (or ``tenant``); also null where the table holds
    unscoped rows too."""
    if column.nullable:
        return sa.or_(column.is_(None), column == tenant)
    return column == tenant


def bare_scoped_tables(expression: t.Any) -> set[sa.Table]:
    """Tenant tables whose columns ``expression`` uses outside any SELECT of its own."""
    found: set[sa.Table] = set()

    def walk(element: t.Any) -> None:
        if isinstance(element, sa.sql.Select):
            return
        table = getattr(element, "table", None)
        if isinstance(element, sa.sql.ColumnElement) and table is not None:
            plain = _sqla.plain_table(table)
            if plain in REGISTRY.tenant_columns:
                found.add(plain)
        for child in element.get_children():
            walk(child)

    walk(expression)
    return found

