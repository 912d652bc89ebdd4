"""SQL comments naming the tenant (``TENANT_JOBS_SQL_COMMENT``), in the sqlcommenter format.

While a tenant is current, every statement run on the app's engines ends with
`` /*tenant='acme'*/`` (before a trailing ``;``), so that ``pg_stat_activity``,
slow-query logs, ``auto_explain`` and, for the first text of each query,
``pg_stat_statements`` show whose statement it is.

The comment is added to the SQL string only as it goes to the driver
(``before_cursor_execute`` with ``retval=True``): SQLAlchemy has compiled and
cached the statement without it, so its compiled cache keeps one entry per
statement, not one per tenant. Drivers that prepare statements on the server
(psycopg 3 after ``prepare_threshold`` runs) key them by the final text, so each
tenant's statement is prepared once, with its comment, and never handed to
another tenant.
"""

from __future__ import annotations

import typing as t
from urllib.parse import quote
from weakref import WeakSet

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from .. import context

#: The sqlcommenter key.
KEY = "tenant"
#: Paramstyles whose drivers read ``%`` in the SQL text as the start of a placeholder.
_PERCENT_PARAMSTYLES = frozenset({"format", "pyformat"})
_MAX_CACHED_COMMENTS = 10_000
_commented_engines: WeakSet[Engine] = WeakSet()


def sql_comment(tenant: str) -> str:
    """The comment for ``tenant``: `` /*tenant='acme'*/``.

    As sqlcommenter specifies, the value is URL-encoded (which also encodes
    ``'``, ``*`` and ``/``, so it can neither end the quote nor the comment)
    and single-quoted.
    """
    return f" /*{KEY}='{quote(tenant, safe='')}'*/"


def with_comment(statement: str, comment: str) -> str:
    """``statement`` with ``comment`` at its end, before a trailing semicolon if it has one."""
    stripped = statement.rstrip()
    if stripped.endswith(";"):
        return stripped[:-1] + comment + ";"
    return statement + comment


def install(app: Flask, db: SQLAlchemy) -> None:
    """Comment the statements of every engine of ``db`` for ``app`` (once per engine)."""
    with app.app_context():
        engines = list(db.engines.values())
    for engine in engines:
        if engine not in _commented_engines:
            _commented_engines.add(engine)
            event.listen(engine, "before_cursor_execute", _commenter(engine), retval=True)


def _commenter(engine: Engine) -> t.Callable[..., tuple[str, t.Any]]:
    """The ``before_cursor_execute`` listener that comments ``engine``'s statements."""
    percent = engine.dialect.paramstyle in _PERCENT_PARAMSTYLES
    comments: dict[str, str] = {}

    def add_tenant_comment(
        connection: Connection,
        cursor: t.Any,
        statement: str,
        parameters: t.Any,
        execution_context: t.Any,
        executemany: bool,
    ) -> tuple[str, t.Any]:
        tenant = context.get_tenant()
        if tenant is None:
            return statement, parameters
        comment = comments.get(tenant)
        if comment is None:
            if len(comments) >= _MAX_CACHED_COMMENTS:
                comments.clear()
            comment = sql_comment(tenant)
            if percent:  # an encoded character would read as a placeholder
                comment = comment.replace("%", "%%")
            comments[tenant] = comment
        return with_comment(statement, comment), parameters

    return add_tenant_comment
