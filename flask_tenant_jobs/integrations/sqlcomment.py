"""SQL comments naming the tenant (``TENANT_JOBS_SQL_COMMENT``), in the sqlcommenter format.

While a tenant is current, every statement run on the app's engines ends with
`` /*tenant='acme'*/`` (before a trailing ``;``), so that ``pg_stat_activity``,
slow-query logs, ``auto_explain`` and, for the first text of each query,
``pg_stat_statements`` show whose statement it is.

The comment is added to the SQL string only as it is handed to the driver, in
SQLAlchemy's dialect events ``do_execute``, ``do_executemany`` and
``do_execute_no_params``: SQLAlchemy has compiled and cached the statement
without it, so its compiled cache keeps one entry per statement, not one per
tenant. (A ``before_cursor_execute`` listener would do the same, but the first
such listener on an engine turns on SQLAlchemy's connection-event path, which
costs about 15 µs per statement; the dialect events cost about 2.) Drivers that
prepare statements on the server (psycopg 3 after ``prepare_threshold`` runs)
key them by the final text, so each tenant's statement is prepared once, with
its comment, and never handed to another tenant.
"""

from __future__ import annotations

import typing as t
from urllib.parse import quote
from weakref import WeakSet

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine

from .. import context

#: The sqlcommenter key.
KEY = "tenant"
_PERCENT_PARAMSTYLES = frozenset({"format", "pyformat"})
#: Commented statements kept (per tenant and statement): the same string object each time,
#: whose hash the drivers' statement caches then need not compute again.
_MAX_CACHED_STATEMENTS = 2_000
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
            _listen(engine)


def _listen(engine: Engine) -> None:
    """Hand ``engine``'s driver each statement with the current tenant's comment."""
    dialect = engine.dialect
    # With parameters, these drivers read ``%`` in the SQL as the start of a placeholder.
    percent = dialect.paramstyle in _PERCENT_PARAMSTYLES
    comments = _Comments(escape_percent=percent)
    plain = _Comments(escape_percent=False)

    event.listen(engine, "do_execute", _commenting(dialect.do_execute, comments))
    event.listen(engine, "do_executemany", _commenting(dialect.do_executemany, comments))
    event.listen(engine, "do_execute_no_params", _commenting(dialect.do_execute_no_params, plain))


def _commenting(run: t.Callable[..., None], comments: _Comments) -> t.Callable[..., bool]:
    """A ``do_execute*`` hook that runs the statement with the current tenant's comment
    through ``run`` (the dialect's own method), or leaves it to SQLAlchemy with no tenant."""
    kept = comments.kept

    def execute(cursor: t.Any, statement: str, *rest: t.Any) -> bool:
        tenant = context.get_tenant()
        if tenant is None:
            return False
        # the commented statement of before, the same string object: inline, since this
        # runs for every statement (a call here costs a tenth of the comment's price)
        commented = kept.get(tenant, _NONE_KEPT).get(statement)
        run(cursor, commented or comments.commented(tenant, statement), *rest)
        return True

    return execute


#: What ``_Comments.kept`` holds for a tenant none of whose statements ran yet.
_NONE_KEPT: t.Final[dict[str, str]] = {}


class _Comments:
    """The statements run with each tenant's comment, each made once per tenant."""

    def __init__(self, *, escape_percent: bool) -> None:
        self._escape_percent = escape_percent
        #: tenant -> statement -> the statement with that tenant's comment
        self.kept: dict[str, dict[str, str]] = {}
        self._count = 0

    def commented(self, tenant: str, statement: str) -> str:
        """``statement`` with ``tenant``'s comment, made now and kept (at most
        ``_MAX_CACHED_STATEMENTS`` in all: all are forgotten when that is reached)."""
        if self._count >= _MAX_CACHED_STATEMENTS:
            self.kept.clear()
            self._count = 0
        commented = with_comment(statement, self._comment(tenant))
        self.kept.setdefault(tenant, {})[statement] = commented
        self._count += 1
        return commented

    def _comment(self, tenant: str) -> str:
        """The comment for ``tenant``, escaped for the driver where it must be."""
        comment = sql_comment(tenant)
        if self._escape_percent:  # an encoded character is not a placeholder
            comment = comment.replace("%", "%%")
        return comment
