"""Rewriting the ORM statements that loader criteria do not filter: INSERTs and expressions.

An ORM INSERT of a ``TenantScoped`` model gets the current tenant as its
``tenant_id`` whatever form its rows take (``values()``, a list of rows,
parameter rows, ``from_select()``), and its ``ON CONFLICT DO UPDATE`` may only
update a row of the current tenant. The expressions of ``with_expression()``
are filtered like the statement around them.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, ORMExecuteState

from ..errors import TenantError, TenantImmutableError, TenantMismatchError
from . import _sqla
from .criteria import CURRENT_TENANT, bare_scoped_tables, scope_selects, scoped_tables_in

#: What to write instead of a ``tenant_id`` given as an expression.
_PLAIN_TENANT_HINT = (
    "leave 'tenant_id' out (the current tenant is filled in) or give it as a plain string"
)


def given_tenant(values: t.Mapping[t.Any, t.Any]) -> tuple[bool, t.Any]:
    """Whether a row of statement values names ``tenant_id``, and the value it gives."""
    for key, value in values.items():
        if (key if isinstance(key, str) else getattr(key, "key", None)) == "tenant_id":
            return True, value
    return False, None


def plain_value(value: t.Any, what: str) -> t.Any:
    """The plain value of a statement value; refuse a bound parameter or SQL expression.

    ``bindparam("t")`` (filled in at execution) or a subquery could name any tenant.
    """
    if isinstance(value, sa.sql.elements.BindParameter) and value.callable is None:
        if value.value is not None:
            return value.value
    elif not isinstance(value, sa.sql.ClauseElement):
        return value
    raise TenantError(f"{what} gives 'tenant_id' as a SQL expression: {_PLAIN_TENANT_HINT}.")


def param_rows(params: t.Any) -> list[dict[str, t.Any]]:
    """The parameter rows of an executemany (a list of dicts) or of one execution (a dict)."""
    return [dict(row) for row in params] if isinstance(params, list) else [dict(params)]


def check_rows(rows: t.Iterable[t.Mapping[t.Any, t.Any]], tenant: str, what: str) -> None:
    """Refuse rows that name a tenant other than ``tenant``."""
    for row in rows:
        named, given = given_tenant(row)
        if named:
            value = plain_value(given, what)
            if value != tenant:
                raise TenantMismatchError(value, tenant, what)


def scope_insert(state: ORMExecuteState, mapper: Mapper[t.Any], tenant: str) -> None:
    """Fill ``tenant_id`` into an ORM INSERT; refuse rows naming another tenant."""
    what = f"A new {mapper.class_.__name__} row"
    statement: t.Any = state.statement
    selected = _sqla.insert_select(statement)
    if selected is not None:
        statement = _from_select_in_tenant(statement, *selected, tenant)
    elif _sqla.insert_multi_values(statement):
        multi = _sqla.insert_multi_values(statement)
        for rows in multi:
            check_rows(rows, tenant, what)
        statement = _sqla.with_multi_values(
            statement, [[{**_named(row), "tenant_id": tenant} for row in rows] for rows in multi]
        )
    else:
        values = _sqla.insert_values(statement)
        check_rows([values], tenant, what)
        if given_tenant(values)[0] or not state.parameters:  # a given value is replaced
            statement = statement.values(tenant_id=tenant)
    if state.parameters:
        given = param_rows(state.parameters)
        check_rows(given, tenant, what)
        state.parameters = [{**row, "tenant_id": tenant} for row in given]
    # the SELECTs inside an INSERT (from_select(), subqueries in its values) get no
    # loader criteria: they are filtered here
    state.statement = scope_selects(_upsert_in_tenant(statement, mapper, tenant))


def _named(row: t.Mapping[t.Any, t.Any]) -> dict[str, t.Any]:
    """A row of ``values([...])`` keyed by column name (its keys may be columns)."""
    return {(key if isinstance(key, str) else key.key): value for key, value in row.items()}


def _from_select_in_tenant(statement: t.Any, names: list[str], select: t.Any, tenant: str) -> t.Any:
    """An ``INSERT ... FROM SELECT`` whose ``tenant_id`` is the current tenant.

    The SELECT becomes a subquery; its ``tenant_id`` column, if it has one, is
    replaced by the tenant (the rows it reads are filtered as any SELECT is).
    """
    source = list(select.subquery().c)
    pairs = zip(names, source, strict=True)
    kept = [(name, column) for name, column in pairs if name != "tenant_id"]
    rows = sa.select(*(column for _, column in kept), sa.literal(tenant, sa.String()))
    return _sqla.with_select(statement, [name for name, _ in kept] + ["tenant_id"], rows)


def _upsert_in_tenant(statement: t.Any, mapper: Mapper[t.Any], tenant: str) -> t.Any:
    """An upsert whose ``DO UPDATE`` leaves other tenants' rows alone and keeps ``tenant_id``.

    PostgreSQL and SQLite skip a conflicting row that fails the ``DO UPDATE``'s
    ``WHERE``: it is neither updated nor returned by ``RETURNING``.
    """
    clause = _sqla.post_values_clause(statement)
    if clause is None or _sqla.is_on_conflict_do_nothing(clause):
        return statement
    name = mapper.class_.__name__
    if not _sqla.is_on_conflict_do_update(clause):
        raise TenantError(
            f"This upsert of {name} ({type(clause).__name__}) could update another tenant's "
            "row: use insert(...).on_conflict_do_update() (PostgreSQL, SQLite), or look the "
            "row up through the session and change it."
        )
    for key, value in _sqla.conflict_update_values(clause):
        if (key if isinstance(key, str) else getattr(key, "key", None)) != "tenant_id":
            continue
        if not _is_excluded_tenant(value) and _literal(value) != tenant:
            shown = _literal(value) or "a SQL expression"
            raise TenantImmutableError(tenant, shown, f"Each {name} row this upsert updates")
    tenant_id = mapper.columns["tenant_id"]
    return _sqla.with_conflict_where(statement, clause, tenant_id == CURRENT_TENANT)


def _is_excluded_tenant(value: t.Any) -> bool:
    """Whether an upsert sets ``tenant_id`` to the inserted row's (the current tenant)."""
    table = getattr(value, "table", None)
    return getattr(value, "key", None) == "tenant_id" and getattr(table, "name", None) == "excluded"


def _literal(value: t.Any) -> t.Any:
    if isinstance(value, sa.sql.elements.BindParameter) and value.callable is None:
        return value.value
    return None if isinstance(value, sa.sql.ClauseElement) else value


def scope_query_expressions(
    statement: t.Any, entity_tables: t.Callable[[t.Any], set[t.Any]]
) -> t.Any:
    """``statement`` with the expressions of its ``with_expression()`` options filtered.

    ``with_expression()`` strips the ORM annotations that loader criteria follow,
    so each SELECT in the expression is filtered here. Columns of a tenant table
    used outside any SELECT would add that table to the query unfiltered, unless
    it is the table of an entity the statement selects (and so filters).
    """
    options = _sqla.options_of(statement)
    if not any(_sqla.query_expressions(option) for option in options):
        return statement
    for option in options:
        for expression in _sqla.query_expressions(option):
            unfiltered = bare_scoped_tables(expression) - entity_tables(statement)
            if unfiltered:
                names = ", ".join(sorted(table.name for table in unfiltered))
                raise TenantError(
                    f"with_expression() uses columns of the tenant table(s) {names} outside a "
                    "subquery, which would read every tenant's rows: select them in a "
                    "correlated scalar subquery instead (e.g. select(func.count(Order.id))"
                    ".where(Order.plan_id == Plan.id).scalar_subquery())."
                )
    replaced = [
        _sqla.with_query_expressions_replaced(option, scope_selects)
        if _sqla.query_expressions(option)
        else option
        for option in options
    ]
    return _sqla.with_options_replaced(statement, replaced)


def refuse_nested_scoped_dml(statement: t.Any, what: str) -> None:
    """Refuse a ``dml_strategy`` that runs ``statement`` as Core when it reaches tenant rows."""
    if scoped_tables_in(statement):
        raise TenantError(
            f"{what} runs as Core SQL, which the tenant filter cannot reach: leave out "
            "execution_options(dml_strategy='core_only') (ORM UPDATE and DELETE statements "
            "are filtered), or filter by 'tenant_id' yourself in a Core statement on the table."
        )
