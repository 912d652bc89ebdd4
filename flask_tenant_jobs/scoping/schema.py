"""Schema strategy (PostgreSQL): one schema per tenant.

Every statement runs with ``search_path`` set to the tenant's schema, then the
shared schema, through ``set_config('search_path', ..., true)``: a
transaction-local setting, so nothing survives a commit, a rollback or the
return of the connection to the pool. It rides on the transaction's ``BEGIN``
(:class:`flask_tenant_jobs.libpq.TransactionSetting`), and the path is trusted
only while libpq reports that same transaction open, it carried no other path
and ran only statements SQLAlchemy built (no SQL text): otherwise it is set
again before each statement, so no savepoint rollback, however it is written,
and no ``SET`` or ``RESET`` of the application's leaves a statement with
another path. The statement that sets it also checks that the tenant's schema
still exists (``::regnamespace``), so a schema dropped behind this process's
back raises ``SchemaNotFoundError`` instead of letting the shared schema answer.
On an AUTOCOMMIT connection, where each statement is its own transaction, the
path is set for the session before each statement and reset when the
connection goes back to the pool.

With Flask-Migrate installed on the app, ``create`` and ``migrate`` run the
Alembic migrations to head inside the tenant, with the tenant's
``alembic_version`` table in its own schema.

Models are tenant models unless their class sets ``__tenant_shared__ = True``;
shared models live in the shared schema (``TENANT_JOBS_SHARED_SCHEMA``).
Tenant objects are keyed in the identity map by tenant, as with the column
strategy, so the same primary key in two schemas never yields the wrong row.
"""

from __future__ import annotations

import re
import threading
import typing as t
from contextlib import contextmanager
from weakref import WeakKeyDictionary, WeakSet

import sqlalchemy as sa
from flask import Flask, current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction
from sqlalchemy.sql import visitors

from .. import context, libpq, responses
from ..errors import (
    RELOAD_HINT,
    ConfigurationError,
    InvalidTenantNameError,
    NoTenantError,
    SchemaNotFoundError,
    TenantMismatchError,
)
from ..settings import Settings
from . import _sqla
from .column import ColumnStrategy, check_added_in
from .hooks import listen_once
from .tenancy import required_tenant

_MAX_CACHED_PATHS = 10_000
#: Schema names PostgreSQL keeps for itself: a tenant must never get one.
_RESERVED_SCHEMA = re.compile(r"pg_.*|information_schema", re.IGNORECASE)

#: Alembic keeps its current context in module globals and Flask-Migrate's
#: ``configure_args`` is one dict per app: one migration at a time per process.
_alembic_lock = threading.Lock()


def is_shared_model(cls: type) -> bool:
    """Whether a model lives in the shared schema (``__tenant_shared__ = True``)."""
    return bool(getattr(cls, "__tenant_shared__", False))


class SchemaStrategy:
    """Scopes every statement to the tenant's PostgreSQL schema through ``search_path``."""

    def __init__(self, settings: Settings, db: SQLAlchemy) -> None:
        self.db = db
        self.schema_format = settings.schema_format
        self.shared_schema = settings.shared_schema
        self.require_tenant = settings.require_tenant
        if _RESERVED_SCHEMA.match(settings.schema_format):
            raise ConfigurationError(
                f"'TENANT_JOBS_SCHEMA_FORMAT' is {settings.schema_format!r}: PostgreSQL keeps "
                "names starting with 'pg_' for itself; use e.g. 'tenant_{tenant}'."
            )
        #: compiled statement -> whether it reaches a tenant table (for statements with no tenant)
        self._reaches_tenant_tables: WeakKeyDictionary[t.Any, bool] = WeakKeyDictionary()
        self._known_schemas: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._paths: dict[str | None, libpq.Values] = {}
        self._search_path = _SearchPath(self)

    # -- the Strategy interface ----------------------------------------------------

    def install(self, app: Flask, db: SQLAlchemy) -> None:
        """Hook the engines of ``app`` and ``db``'s sessions; ``TenantScoped`` keeps working."""
        ColumnStrategy(db).install(app, db)
        with app.app_context():
            for engine in db.engines.values():
                if engine.dialect.name != "postgresql":
                    raise _not_postgres(engine)
                libpq.check_psycopg(engine, "'TENANT_JOBS_STRATEGY' = 'schema'")
                self._search_path.install(engine)
        listen_once(db.session, "do_orm_execute", _guard_orm_execute)
        listen_once(db.session, "before_flush", _guard_flush)
        responses.answer_not_found(app, SchemaNotFoundError, responses.NO_SUCH_TENANT)

    def check_tenant(self, name: str) -> None:
        """Raise ``SchemaNotFoundError`` unless the tenant's schema exists."""
        schema = self.schema_for(name)
        if not self._schema_exists(schema):
            raise SchemaNotFoundError(name, schema)

    def create(self, name: str) -> list[str]:
        """Create the tenant's schema and its tables in one transaction; return the tables made.

        With Flask-Migrate, run the migrations to head instead; if they fail, the
        schema is dropped again (unless it existed before).
        """
        schema = self.schema_for(name)
        alembic = _uses_flask_migrate()
        with self.db.engine.begin() as connection:
            existed = self._schema_in_database(connection, schema)
            before = _tables_in(connection, schema) if existed else set()
            connection.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
            if not alembic:
                self._create_tables(connection, schema)
                made = _tables_in(connection, schema) - before
        if alembic:
            try:
                self._upgrade(name, schema)
            except BaseException:
                if not existed:
                    self.drop(name)
                raise
            with self.db.engine.connect() as connection:
                made = _tables_in(connection, schema) - before
        self._note_schema(schema, exists=True)
        return sorted(made)

    def drop(self, name: str) -> dict[str, int]:
        """Drop the tenant's schema and everything in it; return the rows each table had."""
        schema = self.schema_for(name)
        with self.db.engine.begin() as connection:
            rows = _row_counts(connection, schema)
            connection.execute(sa.schema.DropSchema(schema, cascade=True, if_exists=True))
        self._note_schema(schema, exists=False)
        return rows

    def migrate(self, name: str) -> None:
        """Bring the tenant's schema up to date: create missing tables.

        With Flask-Migrate, run the Alembic migrations to head instead (one
        tenant at a time per process, whatever the number of threads).
        """
        schema = self.schema_for(name)
        self.check_tenant(name)
        if _uses_flask_migrate():
            self._upgrade(name, schema)
            return
        with self.db.engine.begin() as connection:
            self._create_tables(connection, schema)

    def describe(self, name: str) -> dict[str, str]:
        """The tenant's schema, whether it exists and, with Alembic, its revision.

        ``revision`` appears when the schema has an Alembic version table (``-``
        while it is empty).
        """
        schema = self.schema_for(name)
        facts = {"schema": schema, "exists": "yes" if self._schema_exists(schema) else "no"}
        if facts["exists"] == "yes":
            revision = self._revision(schema)
            if revision is not None:
                facts["revision"] = revision
        return facts

    def check_storage(self) -> list[str]:
        """Tenant tables found in the shared schema, with how to remove them.

        A tenant whose schema lacks one of its tables would read and write the
        shared schema's table of that name instead (it follows on the
        ``search_path``); such tables usually come from ``db.create_all()``.
        """
        expected = {table.name for table in self.tenant_tables() if table.schema is None}
        if not expected:  # no tenant models defined (yet): nothing to look for
            return []
        with self.db.engine.connect() as connection:
            found = sorted(_tables_in(connection, self.shared_schema) & expected)
        if not found:
            return []
        shared = _quote(self.shared_schema)
        drops = ", ".join(f"{shared}.{_quote(table)}" for table in found)
        return [
            f"Tenant tables found in the shared schema {self.shared_schema!r}: "
            f"{', '.join(found)}. A tenant whose own schema lacks one of them reads and writes "
            "the shared one instead. They usually come from db.create_all(): create shared "
            "tables with db.metadata.create_all(db.engine, tables=[...]) and tenant tables with "
            "'flask tenant-jobs create' or 'migrate'. Once any rows you need are moved, remove "
            f"them with: DROP TABLE {drops};"
        ]

    # -- helpers ----------------------------------------------------------------------

    def schema_for(self, name: str) -> str:
        """The schema name of tenant ``name`` (``TENANT_JOBS_SCHEMA_FORMAT``)."""
        schema = self.schema_format.format(tenant=name)
        if len(schema.encode()) > 63:
            raise InvalidTenantNameError(name, f"its schema name {schema!r} is over 63 bytes")
        if schema == self.shared_schema or _RESERVED_SCHEMA.fullmatch(schema):
            what = "the shared schema" if schema == self.shared_schema else "a PostgreSQL schema"
            raise InvalidTenantNameError(
                name,
                f"its schema name {schema!r} is {what}; pick another tenant name, or a "
                "'TENANT_JOBS_SCHEMA_FORMAT' such as 'tenant_{tenant}'",
            )
        return schema

    def search_path(self, tenant: str | None) -> str:
        """The ``search_path`` value for ``tenant`` (the shared schema alone for none)."""
        shared = _quote(self.shared_schema)
        return f"{_quote(self.schema_for(tenant))}, {shared}" if tenant else shared

    def tenant_tables(self) -> list[sa.Table]:
        """The tables that live in each tenant's schema (every table of a non-shared model)."""
        shared = {
            table
            for mapper in self.db.Model.registry.mappers  # type: ignore[attr-defined]
            if is_shared_model(mapper.class_)
            for table in mapper.tables
        }
        return [table for table in self.db.metadata.sorted_tables if table not in shared]

    def _create_tables(self, connection: Connection, schema: str) -> None:
        translated = connection.execution_options(schema_translate_map={None: schema})
        self.db.metadata.create_all(translated, tables=self.tenant_tables())

    def _upgrade(self, name: str, schema: str) -> None:
        """Run the Flask-Migrate (Alembic) migrations to head in tenant ``name``'s schema.

        Inside the tenant, so every migration statement runs with the tenant's
        ``search_path``; Alembic's version table goes in the tenant's schema
        through ``version_table_schema`` in Flask-Migrate's ``configure_args``
        (which the default ``env.py`` passes to ``context.configure``).
        """
        from alembic import command

        migrate = current_app.extensions["migrate"]
        with _alembic_lock, context.active(name), _version_table_in(migrate, schema):
            # flask_migrate.upgrade() without its error handler, which exits the process
            command.upgrade(migrate.migrate.get_config(), "head")

    def _revision(self, schema: str) -> str | None:
        """The Alembic revision(s) recorded in ``schema``, ``-`` if none, ``None`` if no table."""
        table = f"{_quote(schema)}.{_quote(_version_table())}"
        with self.db.engine.connect() as connection:
            if connection.scalar(sa.text("SELECT to_regclass(:table)"), {"table": table}) is None:
                return None
            versions = connection.scalars(sa.text(f"SELECT version_num FROM {table} ORDER BY 1"))
            return ",".join(versions) or "-"

    @staticmethod
    def _schema_in_database(connection: Connection, schema: str) -> bool:
        found = connection.scalar(
            sa.text("SELECT to_regnamespace(:schema)"), {"schema": _quote(schema)}
        )
        return found is not None

    def _schema_exists(self, schema: str) -> bool:
        """Whether ``schema`` exists; a miss reads ``pg_namespace`` again before answering."""
        if schema not in self._known_schemas:
            self._load_schemas()
        return schema in self._known_schemas

    def _load_schemas(self) -> None:
        with self._lock, self.db.engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT nspname FROM pg_namespace"))
            self._known_schemas = frozenset(row[0] for row in rows)

    def _path_and_schema(self, tenant: str | None) -> libpq.Values:
        """The ``search_path`` for ``tenant`` and the quoted schema that must exist (cached)."""
        try:
            return self._paths[tenant]
        except KeyError:
            pass
        if len(self._paths) >= _MAX_CACHED_PATHS:
            self._paths.clear()
        schema = _quote(self.schema_for(tenant)) if tenant else None
        found = self._paths[tenant] = (self.search_path(tenant), schema)
        return found

    def _check_no_tenant(self, execution_context: t.Any) -> None:
        """With no tenant (and no ``without_tenant()``), refuse statements on tenant tables."""
        if context.get_tenant() is None and self.require_tenant and not context.is_unscoped():
            self._refuse_tenant_tables(execution_context)

    def _refuse_tenant_tables(self, execution_context: t.Any) -> None:
        """With no tenant, refuse a statement that reaches a tenant table in any way.

        The path is then the shared schema alone: a tenant table reached through a
        join, ``any()``, a subquery, ``select_from()`` or an eager load would be read
        from the shared schema's table of the same name, or fail. The compiled
        statement is looked at (the ORM's eager joins are in it), once per compiled
        form; ``text()`` SQL names no tables and is not refused.
        """
        compiled = getattr(execution_context, "compiled", None)
        if not isinstance(compiled, sa.sql.compiler.SQLCompiler):
            return
        try:
            reaches = self._reaches_tenant_tables[compiled]
        except KeyError:
            tenant_tables = set(self.tenant_tables())
            compile_state = getattr(compiled, "compile_state", None)
            statements = [compiled.statement, getattr(compile_state, "statement", None)]
            reaches = any(
                _sqla.plain_table(node) in tenant_tables
                for statement in statements
                if statement is not None
                for node in visitors.iterate(statement)
                if isinstance(node, sa.sql.FromClause)
            )
            self._reaches_tenant_tables[compiled] = reaches
        if reaches:
            raise NoTenantError("Querying a tenant model")

    def _note_schema(self, schema: str, *, exists: bool) -> None:
        """Record that ``schema`` exists (or not) now, without reading ``pg_namespace``."""
        with self._lock:
            known = self._known_schemas
            self._known_schemas = known | {schema} if exists else known - {schema}


class _SearchPath(libpq.TransactionSetting):
    """The current tenant's ``search_path`` on every transaction; its schema must exist."""

    query = "SELECT set_config('search_path', {}, true), {}::regnamespace"
    #: The same for the session, on AUTOCOMMIT connections.
    session_query = "SELECT set_config('search_path', %s, false), %s::regnamespace"

    def __init__(self, strategy: SchemaStrategy) -> None:
        super().__init__()
        self.strategy = strategy
        #: The DBAPI connections with a session-level path, reset at check-in.
        self._session_paths: WeakSet[t.Any] = WeakSet()

    def install(self, engine: Engine) -> None:
        """Hook ``engine`` (see the base class) and reset session paths at check-in."""
        listen_once(engine.pool, "checkin", self._reset_session_path)
        super().install(engine)

    def for_autocommit(self, dbapi: t.Any, wanted: libpq.Values) -> libpq.Values | None:
        """Set the path for the session, before every statement: each is its own transaction,
        and some refuse a pipeline (``DISCARD ALL``, ``CREATE INDEX CONCURRENTLY``)."""
        self._session_paths.add(dbapi)
        self._send(dbapi, wanted, self.session_query)
        return None

    def _reset_session_path(self, dbapi_connection: t.Any, record: t.Any) -> None:
        """Never hand on a connection whose session path may be a tenant's."""
        if dbapi_connection is None or dbapi_connection not in self._session_paths:
            return
        self._session_paths.discard(dbapi_connection)
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("RESET search_path")
            if not dbapi_connection.autocommit:
                dbapi_connection.commit()
        except Exception as error:
            record.invalidate(error)

    def before_statement(self, execution_context: t.Any) -> None:
        """Refuse a statement on tenant tables with no tenant current."""
        self.strategy._check_no_tenant(execution_context)

    def wanted(self) -> libpq.Values:
        """The path of the current tenant (the shared schema alone for none)."""
        return self.strategy._path_and_schema(context.get_tenant())

    def keeps_values(self, execution_context: t.Any) -> bool:
        """Whether the statement cannot change the path: one SQLAlchemy built, not SQL text
        (``SET``, ``RESET ALL``, a ``DO`` block, a function of the application's)."""
        return libpq.built_by_sqlalchemy(execution_context)

    def refused(self, error: Exception, values: libpq.Values) -> Exception:
        """``SchemaNotFoundError`` when the schema is gone (and ``switch()`` refuses it next)."""
        import psycopg

        tenant = context.get_tenant()
        if tenant is None or not isinstance(error, psycopg.errors.InvalidSchemaName):
            return error
        missing = self.strategy.schema_for(tenant)
        self.strategy._note_schema(missing, exists=False)
        return SchemaNotFoundError(tenant, missing)


def _tables_in(connection: Connection, schema: str) -> set[str]:
    """The names of the tables in ``schema``."""
    rows = connection.scalars(
        sa.text("SELECT tablename FROM pg_tables WHERE schemaname = :schema"), {"schema": schema}
    )
    return set(rows)


def _row_counts(connection: Connection, schema: str) -> dict[str, int]:
    """How many rows each table of ``schema`` holds (one query for all of them)."""
    tables = sorted(_tables_in(connection, schema))
    if not tables:
        return {}
    counts = ", ".join(f"(SELECT count(*) FROM {_quote(schema)}.{_quote(t)})" for t in tables)
    return dict(zip(tables, connection.execute(sa.text(f"SELECT {counts}")).one(), strict=True))


def _quote(identifier: str) -> str:
    """``identifier`` as a quoted PostgreSQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def _uses_flask_migrate() -> bool:
    """Whether the current app has Flask-Migrate (then Alembic makes the tenant tables)."""
    return "migrate" in current_app.extensions


def _version_table() -> str:
    """The name of Alembic's version table (``version_table`` in ``configure_args``)."""
    migrate = current_app.extensions.get("migrate")
    configured = migrate.configure_args.get("version_table") if migrate is not None else None
    return str(configured or "alembic_version")


@contextmanager
def _version_table_in(migrate: t.Any, schema: str) -> t.Iterator[None]:
    """Make Flask-Migrate's ``env.py`` keep the version table in ``schema`` for the block."""
    configure_args: dict[str, t.Any] = migrate.configure_args
    missing = object()
    previous = configure_args.get("version_table_schema", missing)
    configure_args["version_table_schema"] = schema
    try:
        yield
    finally:
        if previous is missing:
            configure_args.pop("version_table_schema", None)
        else:
            configure_args["version_table_schema"] = previous


def _guard_orm_execute(state: ORMExecuteState) -> None:
    """Refuse tenant-model statements with no tenant; key loaded objects by tenant."""
    tenant_mappers = [m for m in state.all_mappers if not is_shared_model(m.class_)]
    if not tenant_mappers:
        return
    tenant = required_tenant("Querying a tenant model")
    if state.is_select:
        _check_loaded_from(state, tenant)
        if tenant is not None:
            state.update_execution_options(identity_token=tenant)


def _check_loaded_from(state: ORMExecuteState, tenant: str | None) -> None:
    """Refuse to refresh or lazy-load an object of another tenant with this tenant's schema."""
    parent = state.lazy_loaded_from or _sqla.refreshed_state(state)
    if parent is None or is_shared_model(parent.class_):
        return
    owner = t.cast("str | None", parent.identity_token)
    if owner != tenant:
        what = "Lazy-loading a relationship of" if state.lazy_loaded_from else "Refreshing"
        described = f"{what} {parent.class_.__name__} {parent.identity}"
        raise TenantMismatchError(owner, tenant, described, RELOAD_HINT)


def _guard_flush(session: Session, flush_context: UOWTransaction, instances: object) -> None:
    """Key new tenant objects by tenant; refuse writes to objects of another tenant."""
    pending = [o for o in session.new if not is_shared_model(type(o))]
    touched = [o for o in (*session.dirty, *session.deleted) if not is_shared_model(type(o))]
    if not (pending or touched):
        return
    tenant = required_tenant("Saving a tenant model")
    for obj in pending:
        check_added_in(obj, tenant)
        sa.inspect(obj).identity_token = tenant
    for obj in touched:
        owner = sa.inspect(obj).identity_token
        if owner != tenant:
            raise TenantMismatchError(owner, tenant, f"The {type(obj).__name__} being saved")


def _not_postgres(engine: Engine) -> ConfigurationError:
    return ConfigurationError(
        f"'TENANT_JOBS_STRATEGY' is 'schema' but the database is {engine.dialect.name!r}: "
        "the schema strategy needs PostgreSQL (use 'column' for other databases)."
    )
