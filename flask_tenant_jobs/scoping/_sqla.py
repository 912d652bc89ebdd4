"""Every use of SQLAlchemy's private API by the scoping strategies, in one place.

SQLAlchemy has no public accessor for some parts of a statement that tenant
scoping must read or rewrite (the values of an INSERT, its ON CONFLICT clause,
the expression of ``with_expression()``), nor for some parts of an ORM execution
(whether a load is a refresh, which identity token a load uses). Each helper
below says which private name it touches and why; the supported SQLAlchemy
releases (``pyproject.toml``) are the ones the test suite ran these helpers on.
"""

from __future__ import annotations

import typing as t
from copy import copy

import sqlalchemy as sa
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.orm.context import QueryContext
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.util import immutabledict

#: The strategy key of a ``with_expression()`` load element.
_QUERY_EXPRESSION = (("query_expression", True),)


def options_of(statement: t.Any) -> tuple[t.Any, ...]:
    """The loader options given to ``statement`` (``Executable._with_options``).

    Read to tell whether the tenant criteria are on a statement already (from
    ``get()`` or a relationship load it inherited them from).
    """
    return t.cast("tuple[t.Any, ...]", statement._with_options)


def with_options_replaced(statement: t.Any, options: t.Iterable[t.Any]) -> t.Any:
    """A copy of ``statement`` whose loader options are ``options``.

    There is no public way to remove an option (``without_tenant()`` drops the
    criteria a relationship load inherited), so the copy is made with
    ``_generate()`` and ``_with_options`` is set on it.
    """
    replaced = statement._generate()
    replaced._with_options = tuple(options)
    return replaced


def refreshed_state(state: ORMExecuteState) -> InstanceState[t.Any] | None:
    """The object whose expired attributes this load refreshes (``load_options._refresh_state``).

    Refreshes load by primary key without loader criteria, so the object's owner
    has to be checked before one runs.
    """
    return t.cast("InstanceState[t.Any] | None", state.load_options._refresh_state)


def load_identity_token(state: ORMExecuteState) -> t.Any:
    """The identity token this load keys its objects with (``load_options._identity_token``).

    Set by ``Session.get()`` from its ``identity_token`` argument; the execution
    option of that name reaches it only once the hooks have run.
    """
    return state.load_options._identity_token


def is_plain_orm_select(statement: t.Any) -> bool:
    """Whether ``statement`` is an ORM ``select()`` with no execution options of its own
    (``_execution_options``: no identity token, no load options) that refreshes nothing
    (``_compile_options._for_refresh_state``).

    Such a statement carries nothing the scoping hook checks before filtering it.
    """
    return (
        type(statement) is sa.Select
        and not statement._execution_options
        and statement._propagate_attrs.get("compile_state_plugin") == "orm"
        and not getattr(statement._compile_options, "_for_refresh_state", False)
    )


def with_added(
    statement: t.Any, options: tuple[t.Any, ...], execution_options: t.Mapping[str, t.Any]
) -> t.Any:
    """A copy of ``statement`` with ``options`` added to its loader options and
    ``execution_options`` to its execution options, in one copy.

    ``options()`` then ``execution_options()`` would copy the statement twice; the copy
    is made with ``_generate()`` and ``_with_options`` and ``_execution_options`` are set
    on it, as those methods set them (``options`` are loader options already).
    """
    added = statement._generate()
    added._with_options = statement._with_options + options
    added._execution_options = statement._execution_options.union(execution_options)
    return added


#: Per identity token, the execution options of a load under it (bounded, see below).
_loading_under: dict[t.Any, t.Any] = {}
_TOKENS_KEPT = 4096


def loading_under_token(token: t.Any) -> t.Mapping[str, t.Any]:
    """Execution options that make an ORM load key its objects by ``token``.

    The ORM's load options themselves (``_sa_orm_load_options``, what the
    ``identity_token`` execution option is turned into at every execution), made
    once per token: a kept statement then runs without that per-execution merge.
    """
    options = _loading_under.get(token)
    if options is None:
        if len(_loading_under) >= _TOKENS_KEPT:
            _loading_under.clear()
        load = QueryContext.default_load_options + {"_identity_token": token}
        options = _loading_under[token] = immutabledict({"_sa_orm_load_options": load})
    return options


class _NoMoreListeners:
    """Stands for a parent execution with no ``do_orm_execute`` listener left to run."""

    def _remaining_events(self) -> list[t.Any]:
        return []


#: Given as ``_parent_execute_state``: the execution runs no ``do_orm_execute`` listener.
NO_MORE_LISTENERS = _NoMoreListeners()


class TokenChoosingSession(Session):
    """A session whose identity-map lookups choose their identity token.

    ``Session._identity_lookup`` is the lookup behind ``get()`` and many-to-one
    lazy loads, consulted before any SQL runs; SQLAlchemy's horizontal sharding
    extension overrides it to choose the token, and so does this class, through
    :meth:`lookup_token`. ``Session._execute_internal``, behind every ORM
    execution, is overridden to raise :attr:`unwrapped_errors` as themselves.
    """

    #: Errors raised while a statement's parameters are read (a ``bindparam``
    #: callable), which SQLAlchemy wraps in ``StatementError``: raised as themselves.
    unwrapped_errors: tuple[type[BaseException], ...] = ()
    #: The token :meth:`get_by_statement`'s caller chose and checked, for its lookup.
    _chosen_token: t.Any = None

    def lookup_token(
        self, mapper: t.Any, given: t.Any, lazy_loaded_from: InstanceState[t.Any] | None
    ) -> t.Any:
        """The identity token to look ``mapper``'s objects up with (``given`` by the caller)."""
        return given

    def _identity_lookup(  # type: ignore[override]
        self,
        mapper: t.Any,
        primary_key_identity: t.Any,
        identity_token: t.Any = None,
        lazy_loaded_from: InstanceState[t.Any] | None = None,
        **kwargs: t.Any,
    ) -> t.Any:
        chosen, self._chosen_token = self._chosen_token, None
        if chosen is None or lazy_loaded_from is not None:
            identity_token = self.lookup_token(mapper, identity_token, lazy_loaded_from)
        return super()._identity_lookup(
            mapper,
            primary_key_identity,
            identity_token=identity_token,
            lazy_loaded_from=lazy_loaded_from,
            **kwargs,
        )

    def only_execute_listener_is(self, listener: t.Callable[..., t.Any]) -> bool:
        """Whether ``listener`` is this session's only ``do_orm_execute`` listener.

        Read from the dispatch's ``listeners`` (this session's own) and
        ``parent_listeners`` (its class's) without iterating the collection.
        """
        listeners: t.Any = self.dispatch.do_orm_execute
        parents = listeners.parent_listeners
        return not listeners.listeners and len(parents) == 1 and parents[0] is listener

    def get_by_statement(
        self,
        entity: t.Any,
        ident: t.Any,
        token: t.Any,
        load: t.Callable[[t.Sequence[t.Any]], tuple[t.Any, dict[str, t.Any]]],
    ) -> t.Any:
        """``Session.get(entity, ident, identity_token=token)`` whose SELECT, if one runs,
        is ``load(primary key)``: a statement and its parameters, chosen by the caller.

        Through ``Session._get_impl``, the body of ``get()``, with this loader in
        place of SQLAlchemy's: the forms of ``ident`` and the identity-map hits
        (expired and deleted objects included) stay SQLAlchemy's. The SELECT skips
        the ``do_orm_execute`` listeners (``_parent_execute_state``, as
        ``ORMExecuteState.invoke_statement()`` does): for a caller whose listener is
        the only one and whose statement already holds all it would add.
        """

        def run(
            session: Session,
            select: t.Any,
            primary_key_identity: t.Sequence[t.Any],
            *,
            execution_options: t.Mapping[str, t.Any],
            bind_arguments: t.Any,
            **_: t.Any,
        ) -> t.Any:
            statement, params = load(primary_key_identity)
            result = self._execute_internal(
                statement,
                params,
                execution_options={**execution_options, "identity_token": token},
                bind_arguments=bind_arguments,
                _parent_execute_state=NO_MORE_LISTENERS,
            )
            return result.scalars().one_or_none()

        self._chosen_token = token
        try:
            return self._get_impl(entity, ident, run, identity_token=token)
        finally:
            self._chosen_token = None

    def _execute_internal(
        self, statement: t.Any, params: t.Any = None, **kwargs: t.Any
    ) -> t.Any:
        try:
            return super()._execute_internal(statement, params, **kwargs)
        except sa.exc.StatementError as error:
            if isinstance(error.orig, self.unwrapped_errors):
                raise error.orig from None
            raise


# -- INSERT -------------------------------------------------------------------------------


def insert_values(statement: t.Any) -> t.Mapping[t.Any, t.Any]:
    """The single row given by ``Insert.values(**row)`` (``_values``), or an empty mapping."""
    return t.cast("t.Mapping[t.Any, t.Any]", statement._values or {})


def insert_multi_values(statement: t.Any) -> list[list[t.Mapping[t.Any, t.Any]]]:
    """The rows given by ``Insert.values([row, ...])`` (``_multi_values``)."""
    return [list(rows) for rows in statement._multi_values]


def with_multi_values(statement: t.Any, multi: list[list[dict[str, t.Any]]]) -> t.Any:
    """A copy of ``statement`` whose ``values([...])`` rows are ``multi``.

    ``values()`` would add the rows to the existing ones, not replace them.
    """
    replaced = statement._generate()
    replaced._multi_values = tuple(multi)
    return replaced


def insert_select(statement: t.Any) -> tuple[list[str], t.Any] | None:
    """The column names and SELECT of ``Insert.from_select()`` (``_select_names``), or ``None``."""
    if statement._select_names is None:
        return None
    return list(statement._select_names), statement.select


def with_select(statement: t.Any, names: list[str], select: t.Any) -> t.Any:
    """A copy of a ``from_select()`` INSERT that inserts ``names`` from ``select``.

    ``from_select()`` refuses to be called twice on one statement, so the copy
    forgets the first call (``_select_names``, ``select``) before calling it again.
    """
    replaced = statement._generate()
    replaced._select_names = None
    replaced.select = None
    return replaced.from_select(names, select)


def plain_table(from_: t.Any) -> t.Any:
    """``from_`` without the ORM's annotations (``_deannotate()``), to look its table up."""
    return from_._deannotate() if hasattr(from_, "_deannotate") else from_


def post_values_clause(statement: t.Any) -> t.Any:
    """The ``ON CONFLICT`` (or ``ON DUPLICATE KEY``) clause of an INSERT (``_post_values_clause``).
    """
    return statement._post_values_clause


def is_on_conflict_do_update(clause: t.Any) -> bool:
    """Whether ``clause`` is the ``on_conflict_do_update()`` of PostgreSQL or SQLite."""
    return hasattr(clause, "update_values_to_set") and hasattr(clause, "update_whereclause")


def is_on_conflict_do_nothing(clause: t.Any) -> bool:
    """Whether ``clause`` is the ``on_conflict_do_nothing()`` of PostgreSQL or SQLite."""
    return type(clause).__name__ == "OnConflictDoNothing"


def conflict_update_values(clause: t.Any) -> list[tuple[t.Any, t.Any]]:
    """The ``set_`` of an ``on_conflict_do_update()`` as (key, value) pairs.

    ``update_values_to_set`` is a list of pairs in SQLAlchemy 2.0, a dict in 2.1.
    """
    values = clause.update_values_to_set
    return list(values.items()) if isinstance(values, dict) else list(values)


def with_conflict_where(statement: t.Any, clause: t.Any, where: t.Any) -> t.Any:
    """A copy of an upsert whose ``DO UPDATE`` also requires ``where`` of the existing row.

    The clause's ``update_whereclause`` is and-ed with ``where`` on a copy of it,
    since ``on_conflict_do_update()`` may be called once per statement.
    """
    restricted = copy(clause)
    existing = clause.update_whereclause
    restricted.update_whereclause = where if existing is None else sa.and_(existing, where)
    replaced = statement._generate()
    replaced._post_values_clause = restricted
    return replaced


# -- UPDATE -------------------------------------------------------------------------------


def update_values(statement: t.Any) -> t.Mapping[t.Any, t.Any]:
    """The ``SET`` of ``update().values()`` (``_values``), or an empty mapping."""
    return t.cast("t.Mapping[t.Any, t.Any]", statement._values or {})


def update_ordered_values(statement: t.Any) -> list[tuple[t.Any, t.Any]]:
    """The ``SET`` of ``update().ordered_values()`` (``_ordered_values``), or none."""
    return list(getattr(statement, "_ordered_values", None) or ())


# -- with_expression() --------------------------------------------------------------------


def query_expressions(option: t.Any) -> list[t.Any]:
    """The SQL expressions ``with_expression()`` gave in one loader option.

    They sit on the option's load elements (``Load.context``): in
    ``_extra_criteria`` (SQLAlchemy 2.1, later 2.0) or ``local_opts["expression"]``
    (earlier 2.0). ``with_expression()`` strips their ORM annotations, so loader
    criteria never reach them.
    """
    found: list[t.Any] = []
    for element in getattr(option, "context", ()):
        if getattr(element, "strategy", None) != _QUERY_EXPRESSION:
            continue
        found.extend(element._extra_criteria)
        expression = element.local_opts.get("expression")
        if expression is not None:
            found.append(expression)
    return found


def with_query_expressions_replaced(option: t.Any, replace: t.Callable[[t.Any], t.Any]) -> t.Any:
    """A copy of a loader option whose ``with_expression()`` expressions went through
    ``replace``."""
    elements = []
    for element in option.context:
        if getattr(element, "strategy", None) == _QUERY_EXPRESSION:
            element = element._clone()
            element._extra_criteria = tuple(replace(e) for e in element._extra_criteria)
            expression = element.local_opts.get("expression")
            if expression is not None:
                element.local_opts = element.local_opts.union({"expression": replace(expression)})
        elements.append(element)
    replaced = option._clone()
    replaced.context = tuple(elements)
    return replaced


def add_where(select: t.Any, criteria: t.Sequence[t.Any]) -> None:
    """Add ``criteria`` to a SELECT being cloned by ``visitors.cloned_traverse``.

    The clone is modified in place (``_where_criteria``), as SQLAlchemy's own
    traversals do, so that the SELECTs nested in it are visited as well.
    """
    select._where_criteria += tuple(criteria)
