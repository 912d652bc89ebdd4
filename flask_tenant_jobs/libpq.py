"""Transaction-local settings on every transaction of an engine, trusted only as far as libpq.

Row-level security (the tenant settings) and the schema strategy (``search_path``)
both need a transaction-local setting (``set_config(..., true)``) on every
transaction, set before its first statement. :class:`TransactionSetting` is that
part, for psycopg 3 on PostgreSQL. A hook on the driver's execute calls of each
engine decides from libpq's own transaction status, never from the statement's
text, whether the open transaction carries the values wanted now:

* At the start of a transaction the values ride in one round trip with the
  ``BEGIN`` that psycopg would send anyway (one simple query holding both).
* A transaction that has carried one set of values, and run only statements that
  cannot change them, keeps them: a savepoint rollback can only restore those
  same values.
* After a change of values inside the transaction (a ``switch()``), or a
  statement that may change them itself, they are sent before each of its
  statements, in a pipeline with it when SQLAlchemy built it (one round trip;
  SQL text and server-side cursors get a round trip of their own), so no savepoint
  rollback, however it is written, and no statement of the application's can
  leave a statement with other values.
* On an ``AUTOCOMMIT`` connection they go in a pipeline with each statement, in
  the same implicit transaction.

What a connection carried is forgotten at check-out and check-in, where its
transaction is not the hook's.
"""

from __future__ import annotations

import abc
import select
import typing as t
from contextlib import contextmanager
from weakref import WeakKeyDictionary, WeakSet

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.sql.expression import (
    ReleaseSavepointClause,
    RollbackToSavepointClause,
    SavepointClause,
)

from .errors import ConfigurationError

if t.TYPE_CHECKING:
    import psycopg
    from psycopg import pq

#: The values of a setting, as sent: one text (or NULL) per placeholder of its query.
Values = tuple[str | None, ...]

#: What a transaction carries after its values changed: never the values wanted.
MIXED: Values = ("\x00mixed",)
#: libpq's transaction states (``psycopg.pq.TransactionStatus``).
IDLE, INTRANS = 0, 2
#: The constructs SQLAlchemy compiles to exactly one statement of its own making.
_BUILT = (
    sa.Select,
    sa.CompoundSelect,
    sa.Insert,
    sa.Update,
    sa.Delete,
    SavepointClause,
    RollbackToSavepointClause,
    ReleaseSavepointClause,
)


def check_psycopg(engine: Engine, feature: str) -> None:
    """Refuse a driver other than psycopg 3, or a libpq without pipeline mode."""
    url = engine.url.render_as_string(hide_password=True)
    if engine.dialect.driver != "psycopg":
        raise ConfigurationError(
            f"{feature} needs the psycopg 3 driver, but {url!r} uses "
            f"{engine.dialect.driver!r}: use a 'postgresql+psycopg://' URL."
        )
    import psycopg

    if not psycopg.Pipeline.is_supported():
        raise ConfigurationError(
            f"{feature} needs libpq 14 or later (pipeline mode): install "
            "'psycopg[binary]', which brings its own."
        )


class TransactionSetting(abc.ABC):
    """Values set by one query, carried by every transaction of the hooked engines."""

    #: The query setting the values, with one ``{}`` per value (``%s`` or ``$1``...).
    query: t.ClassVar[str]
    #: What a transaction carries before anything is sent, if that is known.
    unset: t.ClassVar[Values | None] = None

    def __init__(self) -> None:
        self._dbapi_query = self.query.format(*("%s" for _ in range(self.query.count("{}"))))
        self._hooked: WeakSet[Engine] = WeakSet()
        #: Per DBAPI connection, what its open transaction carries.
        self._carried: WeakKeyDictionary[t.Any, Values] = WeakKeyDictionary()

    @abc.abstractmethod
    def wanted(self) -> Values:
        """The values for the statement about to run."""

    def before_statement(self, context: t.Any) -> None:
        """Look at the statement of ``context`` before anything is sent (raise to refuse it)."""
        return None

    def keeps_values(self, context: t.Any) -> bool:
        """Whether the statement of ``context`` leaves the values as they are."""
        return True

    def refused(self, error: Exception, values: Values) -> Exception:
        """The exception to raise when the query setting ``values`` failed with ``error``."""
        return error

    def for_autocommit(self, dbapi: psycopg.Connection[t.Any], wanted: Values) -> Values | None:
        """Before an ``AUTOCOMMIT`` statement: the values to send in a pipeline with it, if any."""
        return None if wanted == self.unset else wanted

    def install(self, engine: Engine) -> None:
        """Hook the driver's execute calls of ``engine``, and its pool's check-out and check-in.

        Install it before anything else hooks them (``TENANT_JOBS_SQL_COMMENT`` runs the
        statement itself, and the first listener that does keeps the rest from running).
        """
        if engine in self._hooked:
            return
        dialect = engine.dialect
        # before any listener that runs the statement itself (the SQL comments): the first
        # that does keeps the ones after it from running at all
        for name, execute in (
            ("do_execute", dialect.do_execute),
            ("do_execute_no_params", dialect.do_execute_no_params),
            ("do_executemany", dialect.do_executemany),
        ):
            event.listen(engine, name, self._carrying(dialect, name, execute))
        # first of all checkout listeners: one of the user's may run SQL on the raw connection
        event.listen(engine.pool, "checkout", self._forget, insert=True)
        event.listen(engine.pool, "checkin", self._forget)
        self._hooked.add(engine)

    def _carrying(
        self, dialect: t.Any, name: str, execute: t.Callable[..., None]
    ) -> t.Callable[..., bool]:
        """A ``do_execute*`` listener: the current values first, then the statement as usual,
        or behind them in a pipeline (``True``: it has run the statement), through the
        ``name`` listeners after this one (e.g. the SQL comments) or the dialect's
        ``execute``."""

        def listener(cursor: t.Any, *args: t.Any) -> bool:
            self.before_statement(args[-1])
            values = self._prepare(cursor, args[-1])
            if values is None:
                return False
            with self._pipeline_behind(cursor.connection, values):
                listeners = getattr(dialect.dispatch, name)
                if not _run_after(listener, listeners, cursor, args):
                    execute(cursor, *args)
            return True

        return listener

    def _prepare(self, cursor: t.Any, context: t.Any) -> Values | None:
        """Make the open transaction carry the current values before the cursor's statement.

        Returns the values when the statement itself must run in a pipeline behind
        them: in a transaction that does not carry them (one round trip for both),
        and on an ``AUTOCOMMIT`` connection, where each statement is its own
        transaction.
        """
        dbapi: psycopg.Connection[t.Any] = cursor.connection
        wanted = self.wanted()
        status = dbapi.pgconn.transaction_status
        if status == INTRANS:
            trusted = self._carried.get(dbapi) == wanted
            if not (trusted and self.keeps_values(context)):
                self._carried[dbapi] = MIXED
            if trusted:
                return None
            if _pipelinable(cursor, context):
                return wanted
            self._send(dbapi, wanted)
            return None
        if status != IDLE:  # a failed transaction: the statement fails (or rolls back) anyway
            return None
        if dbapi.autocommit:
            return self.for_autocommit(dbapi, wanted)
        self._carried.pop(dbapi, None)
        self._begin_with(dbapi, wanted)
        self._carried[dbapi] = wanted if self.keeps_values(context) else MIXED
        return None

    def _forget(self, dbapi_connection: t.Any, *args: t.Any) -> None:
        if dbapi_connection is not None:
            self._carried.pop(dbapi_connection, None)

    def _send(self, dbapi: psycopg.Connection[t.Any], values: Values, query: str = "") -> None:
        """Set ``values`` in a round trip of their own (with ``query``, or the setting's)."""
        import psycopg

        try:
            with dbapi.cursor() as own:
                own.execute(query or self._dbapi_query, values)
        except psycopg.Error as error:
            raise self.refused(error, values) from None

    @contextmanager
    def _pipeline_behind(
        self, dbapi: psycopg.Connection[t.Any], values: Values
    ) -> t.Iterator[None]:
        """Run the block's statement in a psycopg pipeline behind ``values``, so that both are
        in one implicit transaction; if setting them fails, the statement does not run."""
        import psycopg

        own = dbapi.cursor()
        try:
            with dbapi.pipeline():
                own.execute(self._dbapi_query, values)
                yield
        except psycopg.Error as error:
            if own.pgresult is not None:  # the values were set: the statement failed
                raise
            raise self.refused(error, values) from None
        finally:
            own.close()

    def _begin_with(self, dbapi: psycopg.Connection[t.Any], values: Values) -> None:
        """Start the transaction with ``values`` set, in one round trip.

        ``BEGIN`` (with the connection's isolation level and access mode) and the
        query go out as one simple query, the values quoted by libpq: one message,
        where a pipeline of the two costs the client about twice as much. psycopg
        then sees a transaction in progress and sends no ``BEGIN`` of its own.
        """
        from psycopg.pq import Escaping

        pgconn, encoding = dbapi.pgconn, dbapi.info.encoding
        escaping = Escaping(pgconn)
        literals = tuple(
            b"NULL" if v is None else escaping.escape_literal(v.encode(encoding)) for v in values
        )
        query = self._dbapi_query.encode(encoding) % literals
        pgconn.send_query(begin_command(dbapi) + b"; " + query)
        failure = _results_of_query(pgconn)
        if failure is not None:
            raise self.refused(_error_of(failure), values)


def _run_after(
    listener: t.Callable[..., bool], listeners: t.Iterable[t.Any], cursor: t.Any, args: t.Any
) -> bool:
    """Call the ``do_execute*`` listeners after ``listener``, as SQLAlchemy would have; return
    whether one of them ran the statement."""
    after = False
    for other in listeners:
        if after and other(cursor, *args):
            return True
        after = after or other is listener
    return False


def built_by_sqlalchemy(context: t.Any) -> bool:
    """Whether the statement of ``context`` is a single one SQLAlchemy built from a construct
    (``SELECT``, ``INSERT``, ``UPDATE``, ``DELETE``, a savepoint), not SQL text, which may
    hold several statements or ``SET`` anything."""
    compiled = getattr(context, "compiled", None)
    return compiled is not None and isinstance(compiled.statement, _BUILT)


def _pipelinable(cursor: t.Any, context: t.Any) -> bool:
    """Whether the statement can run in a pipeline (which refuses several statements in one
    string, and server-side cursors)."""
    import psycopg

    return built_by_sqlalchemy(context) and not isinstance(cursor, psycopg.ServerCursor)


def begin_command(dbapi: psycopg.Connection[t.Any]) -> bytes:
    """The ``BEGIN`` psycopg would send for this connection's transaction settings."""
    from psycopg import IsolationLevel

    parts = ["BEGIN"]
    if dbapi.isolation_level is not None:
        level = IsolationLevel(dbapi.isolation_level).name.replace("_", " ")
        parts.append(f"ISOLATION LEVEL {level}")
    if dbapi.read_only is not None:
        parts.append("READ ONLY" if dbapi.read_only else "READ WRITE")
    if dbapi.deferrable is not None:
        parts.append("DEFERRABLE" if dbapi.deferrable else "NOT DEFERRABLE")
    return " ".join(parts).encode()


def _results_of_query(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """Send the query and read all its results (one per statement); the first failed one.

    Waits with ``select.poll``, which gevent's monkey-patching makes cooperative.
    """
    from psycopg.pq import ExecStatus

    while pgconn.flush():
        _wait(pgconn.socket, select.POLLIN | select.POLLOUT)
        pgconn.consume_input()
    failure = None
    while True:
        if pgconn.is_busy():
            _wait(pgconn.socket, select.POLLIN)
            pgconn.consume_input()
            continue
        result = pgconn.get_result()
        if result is None:  # every statement's results read
            return failure
        if result.status == ExecStatus.FATAL_ERROR and failure is None:
            failure = result


def _wait(fd: int, events: int) -> None:
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()


def _error_of(result: pq.abc.PGresult) -> Exception:
    """The psycopg exception for a failed result (SQLAlchemy wraps it as usual)."""
    import psycopg
    from psycopg.pq import DiagnosticField

    message = (result.error_message or b"").decode(errors="replace").strip()
    sqlstate = (result.error_field(DiagnosticField.SQLSTATE) or b"").decode()
    try:
        return psycopg.errors.lookup(sqlstate)(message)
    except KeyError:
        return psycopg.DatabaseError(message)
