"""Offboarding under the column strategy: delete one tenant's rows from the shared tables.

Every table of a ``TenantScoped`` model loses the tenant's rows in one
transaction, dependent tables first (a joined-inheritance table by the primary
keys of the tenant's base rows), so a failure part-way deletes nothing.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapper

from .. import context


def scoped_tables(db: SQLAlchemy) -> list[tuple[sa.Table, Mapper[t.Any]]]:
    """The tables of ``db``'s ``TenantScoped`` models with a mapper of each, dependents first."""
    from .criteria import is_scoped_model

    owners: dict[sa.Table, Mapper[t.Any]] = {}
    for mapper in db.Model.registry.mappers:  # type: ignore[attr-defined]
        table = mapper.local_table
        if is_scoped_model(mapper.class_) and isinstance(table, sa.Table):
            owners.setdefault(table, mapper)
    ordered = sa.sql.util.sort_tables(owners)
    return [(table, owners[table]) for table in reversed(ordered)]


def delete_tenant_rows(db: SQLAlchemy, tenant: str) -> dict[str, int]:
    """Delete ``tenant``'s rows from every ``TenantScoped`` table in one transaction.

    Runs as the tenant (database-level policies see it) and returns the number of
    rows deleted per table, by table name. A failure rolls everything back and is raised.
    """
    deleted: dict[str, int] = {}
    session = db.session.session_factory()
    try:
        with context.active(tenant), session.begin():
            for table, mapper in scoped_tables(db):
                connection = session.connection(bind_arguments={"clause": table})
                result = connection.execute(_tenant_rows(table, mapper, tenant))
                deleted[table.name] = result.rowcount
    finally:
        session.close()
    return dict(sorted(deleted.items()))


def _tenant_rows(table: sa.Table, mapper: Mapper[t.Any], tenant: str) -> sa.Delete:
    """``DELETE`` of the tenant's rows of ``table``."""
    if "tenant_id" in table.c:
        return table.delete().where(table.c.tenant_id == tenant)
    base = t.cast(sa.Table, mapper.base_mapper.local_table)  # joined inheritance: shared keys
    keys = sa.select(*base.primary_key.columns).where(base.c.tenant_id == tenant)
    own = list(table.primary_key.columns)
    key = own[0] if len(own) == 1 else sa.tuple_(*own)
    return table.delete().where(key.in_(keys))
