"""Schema strategy (PostgreSQL): one schema per tenant.

Every statement runs with ``search_path`` set to the tenant's schema, then the
shared schema, through ``set_config('search_path', ..., true)``: a
transaction-local setting, so nothing survives a commit, a rollback or the
return of the connection to the pool. The path set on a connection is
remembered only until the transaction (or a savepoint) ends, so a savepoint
rollback that silently restores an older path is never trusted.

Models are tenant models unless their class sets ``__tenant_shared__ = True``;
shared models live in the shared schema (``TENANT_JOBS_SHARED_SCHEMA``).
Tenant objects are keyed in the identity map by tenant, as with the column
strategy, so the same primary key in two schemas never yields the wrong row.
"""

from __future__ import annotations

import threading
import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction

from .. import context
from ..errors import (
    ConfigurationError,
    InvalidTenantNameError,
    NoTenantError,
    SchemaNotFoundError,
    TenantMismatchError,
)
from ..settings import Settings, current_settings
from .column import ColumnStrategy

_PATH = "tenant_jobs_search_path"
_SET_PATH = "SELECT set_config('search_path', %(path)s, true)"


def is_shared_model(cls: type) -> bool:
    """Whether a model lives in the shared schema (``__tenant_shared__ = True``)."""
    return bool(getattr(cls, "__tenant_shared__", False))


class SchemaStrategy:
    """Scopes every statement to the tenant's PostgreSQL schema through ``search_path``."""

    def __init__(self, settings: Settings, db: SQLAlchemy) -> None:
        self.db = db
        self.schema_format = settings.schema_format
        self.shared_schema = settings.shared_schema
        self._known_schemas: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    # -- the Strategy interface ----------------------------------------------------

    def install(self, app: Flask, db: SQLAlchemy) -> None:
        """Hook the engines of ``app`` and ``db``'s sessions; ``TenantScoped`` keeps working."""
        ColumnStrategy().install(app, db)
        with app.app_context():
            for engine in db.engines.values():
                if engine.dialect.name != "postgresql":
                    raise _not_postgres(engine)
                self._listen(engine)
        if not event.contains(db.session, "do_orm_execute", _guard_orm_execute):
            event.listen(db.session, "do_orm_execute", _guard_orm_execute)
            event.listen(db.session, "before_flush", _guard_flush)

    def check_tenant(self, name: str) -> None:
        """Raise ``SchemaNotFoundError`` unless the tenant's schema exists."""
        schema = self.schema_for(name)
        if not self._schema_exists(schema):
            raise SchemaNotFoundError(name, schema)

    def create(self, name: str) -> None:
        """Create the tenant's schema and its tables in one transaction."""
        schema = self.schema_for(name)
        with self.db.engine.begin() as connection:
            connection.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
            self._create_tables(connection, schema)
        self._load_schemas()

    def drop(self, name: str) -> None:
        """Drop the tenant's schema and everything in it."""
        schema = self.schema_for(name)
        with self.db.engine.begin() as connection:
            connection.execute(sa.schema.DropSchema(schema, cascade=True, if_exists=True))
        self._load_schemas()

    def migrate(self, name: str) -> None:
        """Bring the tenant's schema up to date: create missing tables."""
        schema = self.schema_for(name)
        self.check_tenant(name)
        with self.db.engine.begin() as connection:
            self._create_tables(connection, schema)

    def describe(self, name: str) -> dict[str, str]:
        """The tenant's schema and whether it exists (for ``flask tenant-jobs list``)."""
        schema = self.schema_for(name)
        return {"schema": schema, "exists": "yes" if self._schema_exists(schema) else "no"}

    # -- helpers ----------------------------------------------------------------------

    def schema_for(self, name: str) -> str:
        """The schema name of tenant ``name`` (``TENANT_JOBS_SCHEMA_FORMAT``)."""
        schema = self.schema_format.format(tenant=name)
        if len(schema.encode()) > 63:
            raise InvalidTenantNameError(name, f"its schema name {schema!r} is over 63 bytes")
        return schema

    def search_path(self, tenant: str | None) -> str:
        """The ``search_path`` value for ``tenant`` (the shared schema alone for none)."""
        quote = self.db.engine.dialect.identifier_preparer.quote_identifier
        shared = quote(self.shared_schema)
        return f"{quote(self.schema_for(tenant))}, {shared}" if tenant else shared

    def refresh(self) -> None:
        """Forget which schemas exist; the next check reads ``pg_namespace`` again."""
        self._load_schemas()

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

    def _schema_exists(self, schema: str) -> bool:
        """Whether ``schema`` exists; a miss reads ``pg_namespace`` again before answering."""
        if schema not in self._known_schemas:
            self._load_schemas()
        return schema in self._known_schemas

    def _load_schemas(self) -> None:
        with self._lock, self.db.engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT nspname FROM pg_namespace"))
            self._known_schemas = frozenset(row[0] for row in rows)

    def _listen(self, engine: Engine) -> None:
        """Set the path before statements; forget it whenever a transaction or savepoint ends."""

        def set_path(
            connection: Connection,
            cursor: t.Any,
            statement: str,
            parameters: t.Any,
            execution_context: t.Any,
            executemany: bool,
        ) -> None:
            path = self.search_path(context.get_tenant())
            if connection.info.get(_PATH) != path:
                cursor.execute(_SET_PATH, {"path": path})
                connection.info[_PATH] = path

        def forget_path(connection: Connection, *args: t.Any) -> None:
            connection.info.pop(_PATH, None)

        event.listen(engine, "before_cursor_execute", set_path)
        for name in ("begin", "commit", "rollback", "rollback_savepoint", "release_savepoint"):
            event.listen(engine, name, forget_path)
        event.listen(engine.pool, "checkin", _forget_path_on_checkin)


def _forget_path_on_checkin(dbapi_connection: t.Any, record: t.Any) -> None:
    if record is not None:
        record.info.pop(_PATH, None)


def _guard_orm_execute(state: ORMExecuteState) -> None:
    """Refuse tenant-model statements with no tenant; key loaded objects by tenant."""
    tenant_mappers = [m for m in state.all_mappers if not is_shared_model(m.class_)]
    if not tenant_mappers:
        return
    tenant = _require_tenant("Querying a tenant model")
    if tenant is not None and state.is_select:
        state.update_execution_options(identity_token=tenant)


def _guard_flush(session: Session, flush_context: UOWTransaction, instances: object) -> None:
    """Key new tenant objects by tenant; refuse writes to objects of another tenant."""
    pending = [o for o in session.new if not is_shared_model(type(o))]
    touched = [o for o in (*session.dirty, *session.deleted) if not is_shared_model(type(o))]
    if not (pending or touched):
        return
    tenant = _require_tenant("Saving a tenant model")
    for obj in pending:
        sa.inspect(obj).identity_token = tenant
    for obj in touched:
        owner = sa.inspect(obj).identity_token
        if owner != tenant:
            raise TenantMismatchError(owner, tenant, f"The {type(obj).__name__} being saved")


def _require_tenant(action: str) -> str | None:
    tenant = context.get_tenant()
    if tenant is None and not context.is_unscoped() and current_settings().require_tenant:
        raise NoTenantError(action)
    return tenant


def _not_postgres(engine: Engine) -> ConfigurationError:
    return ConfigurationError(
        f"'TENANT_JOBS_STRATEGY' is 'schema' but the database is {engine.dialect.name!r}: "
        "the schema strategy needs PostgreSQL (use 'column' for other databases)."
    )
