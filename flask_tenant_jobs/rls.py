"""Row-level security (PostgreSQL, column strategy): the database's own wall between tenants.

Two halves, one concept:

* **The settings.** With ``TENANT_JOBS_RLS`` on, every transaction on the app's
  engines carries the current tenant in the transaction-local setting
  ``flask_tenant_jobs.tenant``, and ``without_tenant()`` in
  ``flask_tenant_jobs.unscoped`` (``set_config(..., true)``: PostgreSQL forgets
  both when the transaction ends, so nothing survives in the pool). A hook
  (:class:`flask_tenant_jobs.libpq.TransactionSetting`) on
  the driver's execute calls of each engine sends them before a statement when
  the transaction does not carry the current values yet: at the start of a
  transaction they ride in one round trip with the ``BEGIN`` that psycopg would
  send anyway (libpq's pipeline mode); after a switch inside an open transaction
  they go before each of its statements; on an ``AUTOCOMMIT`` connection they go
  in a pipeline with each statement, in the same implicit transaction.
* **The policies.** :func:`enable` gives every ``TenantScoped`` table ``ENABLE``
  and ``FORCE ROW LEVEL SECURITY`` and the policy ``tenant_jobs_isolation``,
  which admits a row only when its ``tenant_id`` is the tenant setting or the
  unscoped setting is ``on``; no tenant, no row. :func:`disable` undoes it,
  :func:`check` says what is unprotected and what to do, and
  :func:`enable_rls_on` / :func:`disable_rls_on` do the same in an Alembic
  revision.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.engine import Connection, Engine

from . import context, libpq
from .errors import ConfigurationError
from .registry import validate_name
from .scoping.column import TenantScoped

if t.TYPE_CHECKING:
    from .settings import Settings

TENANT_SETTING = "flask_tenant_jobs.tenant"
UNSCOPED_SETTING = "flask_tenant_jobs.unscoped"
POLICY = "tenant_jobs_isolation"
TENANT_COLUMN = "tenant_id"

#: Each setting read once per statement (an InitPlan), not once per row.
_ADMITS = (
    f"{{column}} = (SELECT nullif(current_setting('{TENANT_SETTING}', true), '')) "
    f"OR (SELECT current_setting('{UNSCOPED_SETTING}', true)) = 'on'"
)

_PREPARER = PGDialect().identifier_preparer  # type: ignore[no-untyped-call]


# -- the settings on every transaction ------------------------------------------------


def require_driver(app: Flask, db: SQLAlchemy) -> None:
    """Raise ``ConfigurationError`` unless every engine of ``app`` can carry the settings."""
    for engine in _engines(app, db):
        _check_driver(engine)


class TenantSettings(libpq.TransactionSetting):
    """The current tenant (or ``''``) and whether unscoped, on every transaction."""

    query = (
        f"SELECT set_config('{TENANT_SETTING}', {{}}, true), "
        f"set_config('{UNSCOPED_SETTING}', {{}}, true)"
    )
    #: What a transaction carries before anything is sent: no tenant, not unscoped.
    unset = ("", "off")

    def wanted(self) -> libpq.Values:
        """The setting values for now: the current tenant (or ``''``), and whether unscoped.

        A tenant holding a NUL character (only ever set past validation) is refused:
        PostgreSQL text cannot hold one, and libpq would cut the name off at it.
        """
        tenant = context.get_tenant() or ""
        if "\x00" in tenant:
            validate_name(tenant)
        return tenant, "on" if context.is_unscoped() else "off"


_settings = TenantSettings()


def install(app: Flask, db: SQLAlchemy) -> None:
    """Make every transaction on ``app``'s engines carry the current tenant settings."""
    for engine in _engines(app, db):
        _check_driver(engine)
        _settings.install(engine)


def _engines(app: Flask, db: SQLAlchemy) -> list[Engine]:
    with app.app_context():
        return list(db.engines.values())


def _check_driver(engine: Engine) -> None:
    """Refuse anything but psycopg 3 on PostgreSQL with libpq's pipeline mode."""
    if engine.dialect.name != "postgresql":
        url = engine.url.render_as_string(hide_password=True)
        raise ConfigurationError(
            f"'TENANT_JOBS_RLS' needs PostgreSQL, but {url!r} is {engine.dialect.name!r}: "
            "turn it off, or use PostgreSQL."
        )
    libpq.check_psycopg(engine, "'TENANT_JOBS_RLS'")


# -- the policies -----------------------------------------------------------------------


class Operations(t.Protocol):
    """What the Alembic helpers need of ``op``: ``execute`` of a SQL string."""

    def execute(self, sqltext: str) -> object:
        """Run one SQL statement."""


def enable_statements(table: str, schema: str | None = None) -> list[str]:
    """The SQL that protects ``table`` (idempotent: the policy is made anew)."""
    name = _qualified(table, schema)
    admits = _ADMITS.format(column=_PREPARER.quote(TENANT_COLUMN))
    return [
        f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY",
        f"DROP POLICY IF EXISTS {POLICY} ON {name}",
        f"CREATE POLICY {POLICY} ON {name} AS PERMISSIVE FOR ALL TO PUBLIC "
        f"USING ({admits}) WITH CHECK ({admits})",
    ]


def disable_statements(table: str, schema: str | None = None) -> list[str]:
    """The SQL that undoes :func:`enable_statements` (idempotent)."""
    name = _qualified(table, schema)
    return [
        f"DROP POLICY IF EXISTS {POLICY} ON {name}",
        f"ALTER TABLE {name} NO FORCE ROW LEVEL SECURITY",
        f"ALTER TABLE {name} DISABLE ROW LEVEL SECURITY",
    ]


def enable_rls_on(op: Operations, table: str, schema: str | None = None) -> None:
    """In an Alembic revision: protect the tenant table ``table`` (after creating it).

    ``op`` is ``alembic.op``; the table needs a ``tenant_id`` column.
    """
    for statement in enable_statements(table, schema):
        op.execute(statement)


def disable_rls_on(op: Operations, table: str, schema: str | None = None) -> None:
    """In an Alembic revision's ``downgrade``: undo :func:`enable_rls_on`."""
    for statement in disable_statements(table, schema):
        op.execute(statement)


def enable(db: SQLAlchemy, settings: Settings) -> list[str]:
    """Protect every ``TenantScoped`` table; return their names.

    Run it as the tables' owner (``ALTER TABLE`` and ``CREATE POLICY`` need it).
    """
    return _apply(db, settings, enable_statements)


def disable(db: SQLAlchemy, settings: Settings) -> list[str]:
    """Remove the protection :func:`enable` added; return the tables' names."""
    return _apply(db, settings, disable_statements)


def _apply(
    db: SQLAlchemy, settings: Settings, statements: t.Callable[[str, str | None], list[str]]
) -> list[str]:
    names = []
    for engine, tables in _tables_by_engine(db, settings):
        with engine.begin() as connection:
            missing = [table for table in tables if not _exists(connection, table)]
            if missing:
                raise ConfigurationError(
                    f"The tenant table(s) {', '.join(_shown(tb) for tb in missing)} do not "
                    "exist yet: create them (db.create_all() or your migrations) first."
                )
            role = connection.scalar(sa.text("SELECT current_user"))
            for table in tables:
                _run_as_owner(connection, role, table, statements(table.name, table.schema))
                names.append(_name(table))
    return names


def _run_as_owner(
    connection: Connection, role: str, table: sa.Table, statements: list[str]
) -> None:
    """Run ``statements`` on ``table``; a role that does not own it gets a clear error."""
    import psycopg

    try:
        for statement in statements:
            connection.exec_driver_sql(statement)
    except sa.exc.ProgrammingError as error:
        if not isinstance(error.orig, psycopg.errors.InsufficientPrivilege):
            raise
        raise ConfigurationError(
            f"Changing the row-level security of table {_shown(table)} needs its owner, and "
            f"the role {role!r} is not: run it with the owner's database URL (the role that "
            "runs your migrations)."
        ) from None


_TABLE_FACTS = sa.text(
    """
    SELECT c.relrowsecurity, c.relforcerowsecurity,
           p.polcmd, p.polpermissive, p.polroles = '{0}'::oid[],
           pg_get_expr(p.polqual, c.oid), pg_get_expr(p.polwithcheck, c.oid),
           ARRAY(SELECT o.polname::text FROM pg_policy o
                 WHERE o.polrelid = c.oid AND o.polpermissive AND o.polname <> :policy
                 ORDER BY 1)
    FROM pg_class c
    LEFT JOIN pg_policy p ON p.polrelid = c.oid AND p.polname = :policy
    WHERE c.oid = to_regclass(:table)
    """
)
_ROLE = sa.text(
    "SELECT current_user, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
)
_FIX = "run 'flask tenant-jobs rls enable' (or enable_rls_on(op, ...) in a migration)"


def check(db: SQLAlchemy, settings: Settings) -> list[str]:
    """What leaves tenant rows unprotected, each with what to do; empty when all is well."""
    problems = []
    if not settings.rls:
        problems.append(
            "'TENANT_JOBS_RLS' is off, so transactions carry no tenant and the policies "
            "admit no tenant row: set it to True."
        )
    for engine, tables in _tables_by_engine(db, settings):
        with engine.connect() as connection:
            problems += _role_problems(connection)
            for table in tables:
                problems += _table_problems(connection, table)
    problems += _unprotectable(db)
    return problems


def _role_problems(connection: Connection) -> list[str]:
    role, superuser, bypass = connection.execute(_ROLE).one()
    if superuser:
        return [
            f"The database role {role!r} is a superuser, and PostgreSQL applies no row-level "
            "security to superusers: connect the app as a role without SUPERUSER."
        ]
    if bypass:
        return [
            f"The database role {role!r} has BYPASSRLS, so no policy applies to it: run "
            f"'ALTER ROLE {_PREPARER.quote(role)} NOBYPASSRLS' or connect as another role."
        ]
    return []


def _table_problems(connection: Connection, table: sa.Table) -> list[str]:
    name = _shown(table)
    facts = connection.execute(
        _TABLE_FACTS, {"table": _qualified(table.name, table.schema), "policy": POLICY}
    ).one_or_none()
    if facts is None:
        return [f"Table {name} does not exist: create it, then {_FIX}."]
    enabled, forced, command, permissive, public, using, checking, others = facts
    problems = []
    if not enabled:
        problems.append(f"Table {name} does not have row-level security enabled: {_FIX}.")
    if not forced:
        problems.append(
            f"Table {name} does not FORCE row-level security, so its owner bypasses the "
            f"policy: {_FIX}."
        )
    if command is None:
        problems.append(f"Table {name} has no {POLICY!r} policy: {_FIX}.")
    elif not _is_ours(command, permissive, public, using, checking):
        problems.append(
            f"Table {name} has a {POLICY!r} policy that is not the one enable_rls() makes: "
            f"{_FIX} to replace it."
        )
    if others:
        problems.append(
            f"Table {name} has other permissive policies ({', '.join(others)}); a row that "
            f"any permissive policy admits is visible, so they widen {POLICY!r}: make them "
            "AS RESTRICTIVE, or drop them."
        )
    return problems


def _is_ours(
    command: str, permissive: bool, public: bool, using: str | None, checking: str | None
) -> bool:
    """Whether the policy is ``FOR ALL TO PUBLIC``, permissive, with our expression twice."""
    return (
        command == "*"
        and permissive
        and public
        and using is not None
        and using == checking
        and TENANT_SETTING in using
        and UNSCOPED_SETTING in using
    )


def _unprotectable(db: SQLAlchemy) -> list[str]:
    """Tables of ``TenantScoped`` models without a ``tenant_id`` (joined inheritance)."""
    return [
        f"Table {_shown(table)} of the tenant-scoped model {mapper.class_.__name__} has no "
        f"'{TENANT_COLUMN}' column, so no policy can protect its rows: read it only through "
        "the ORM, or give it a tenant_id column of its own and protect it."
        for mapper, table in _scoped_tables(db)
        if TENANT_COLUMN not in table.c
    ]


def _scoped_tables(db: SQLAlchemy) -> list[tuple[t.Any, sa.Table]]:
    """Each table of each ``TenantScoped`` model (once), with the first model using it."""
    seen: dict[sa.Table, t.Any] = {}
    for mapper in db.Model.registry.mappers:  # type: ignore[attr-defined]
        if issubclass(mapper.class_, TenantScoped):
            for table in mapper.tables:
                seen.setdefault(table, mapper)
    return sorted(((m, tb) for tb, m in seen.items()), key=lambda pair: _shown(pair[1]))


def _tables_by_engine(db: SQLAlchemy, settings: Settings) -> list[tuple[Engine, list[sa.Table]]]:
    """The protectable tenant tables, grouped by the engine (bind) they live on."""
    if settings.strategy != "column":
        raise ConfigurationError(
            "Row-level security is for the column strategy: 'TENANT_JOBS_STRATEGY' is "
            f"{settings.strategy!r}."
        )
    bind_keys = {id(metadata): key for key, metadata in db.metadatas.items()}
    grouped: dict[Engine, list[sa.Table]] = {}
    for _, table in _scoped_tables(db):
        if TENANT_COLUMN in table.c:
            engine = db.engines[bind_keys[id(table.metadata)]]
            if engine.dialect.name != "postgresql":
                raise ConfigurationError(
                    f"Row-level security needs PostgreSQL, but table {_shown(table)} is on "
                    f"{engine.dialect.name!r}."
                )
            grouped.setdefault(engine, []).append(table)
    return list(grouped.items())


def _exists(connection: Connection, table: sa.Table) -> bool:
    found = connection.scalar(
        sa.text("SELECT to_regclass(:table)"), {"table": _qualified(table.name, table.schema)}
    )
    return found is not None


def _qualified(table: str, schema: str | None) -> str:
    """``schema.table`` as quoted SQL identifiers (quoted where PostgreSQL needs it)."""
    name = _PREPARER.quote(table)
    return f"{_PREPARER.quote_schema(schema)}.{name}" if schema else name


def _name(table: sa.Table) -> str:
    return f"{table.schema}.{table.name}" if table.schema else table.name


def _shown(table: sa.Table) -> str:
    return repr(_name(table))
