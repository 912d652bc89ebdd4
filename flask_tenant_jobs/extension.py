"""The ``TenantJobs`` Flask extension: wires settings, registry, resolver and strategy."""

from __future__ import annotations

import typing as t
from contextlib import contextmanager
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from blinker import NamedSignal
from flask import Flask, current_app, g, has_app_context, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.exc import SQLAlchemyError

from . import context, responses, rls, signals
from .cli import tenant_jobs_cli
from .errors import ConfigurationError, TenantError
from .integrations import install_integrations
from .iteration import TenantIterator
from .registry import TenantRegistry, validate_name
from .resolvers import Resolver, make_resolver
from .scoping import Strategy, make_strategy
from .sending import TenantCelery, make_celery, register_flask_app
from .sessions import bind_sessions, require_bindable
from .settings import Settings
from .state import extension_of, register
from .worker import REFRESH_COMMAND

if t.TYPE_CHECKING:
    from .fair.setup import QueueRow

_REQUEST_TOKEN = "_tenant_jobs_token"
T = t.TypeVar("T")


@dataclass(frozen=True)
class _AppState:
    """What ``init_app`` builds for one Flask app."""

    settings: Settings
    registry: TenantRegistry
    resolver: Resolver
    strategy: Strategy
    db: SQLAlchemy
    celery: TenantCelery | None


class TenantJobs:
    """Multi-tenancy for a Flask + Flask-SQLAlchemy (+ Celery) app.

    Use ``TenantJobs(app, db=db)`` or, with an app factory, ``TenantJobs()``
    followed by ``init_app(app, db=db)``. The extension is stored as
    ``app.extensions["tenant_jobs"]``.
    """

    def __init__(self, app: Flask | None = None, *, db: SQLAlchemy | None = None) -> None:
        self.db = db
        self._states: WeakKeyDictionary[Flask, _AppState] = WeakKeyDictionary()
        if app is not None:
            self.init_app(app, db=db)

    def init_app(self, app: Flask, *, db: SQLAlchemy | None = None) -> None:
        """Read the ``TENANT_JOBS_*`` settings and hook tenancy into ``app`` and ``db``.

        Once per app: a second call (or a second ``TenantJobs(app)``) raises
        ``ConfigurationError`` before anything is installed twice.
        """
        db = db or self.db or app.extensions.get("sqlalchemy")
        if db is None:
            raise ConfigurationError(
                "TenantJobs needs Flask-SQLAlchemy: call 'db.init_app(app)' first or pass "
                "'init_app(app, db=db)'."
            )
        settings = Settings.from_app(app)
        registry = TenantRegistry(settings.tenants, settings.cache_seconds, settings.stale_seconds)
        resolver = make_resolver(settings)
        strategy = make_strategy(settings, db)
        _refuse_what_cannot_be_installed(app, db, settings)
        register(app, self)
        celery = make_celery(app, settings) if "CELERY" in app.config else None
        if settings.fair_dispatch:  # imported only then: it needs the redis library
            from .fair import setup as fair

            fair.install(app, celery, settings)
        self._states[app] = _AppState(settings, registry, resolver, strategy, db, celery)
        register_flask_app(app, settings)
        self._install(app, self._states[app])

    def _install(self, app: Flask, state: _AppState) -> None:
        """Hook the strategy, integrations, request hooks, answers and commands into ``app``."""
        settings, db = state.settings, state.db
        state.strategy.install(app, db)
        if settings.rls:  # before the integrations' driver hooks (see libpq.TransactionSetting)
            rls.install(app, db)
        install_integrations(app, settings, db)
        _warn_about_storage(app, state.strategy)

        def resolve_request_tenant() -> None:
            self._resolve_request(app, state)

        app.before_request_funcs.setdefault(None, []).insert(0, resolve_request_tenant)
        app.teardown_request(self._end_request)
        responses.install(app)
        app.cli.add_command(tenant_jobs_cli)
        state.resolver.install(app)
        if not settings.shared_session:
            bind_sessions(app, state.registry, state.resolver)

    # -- the current tenant ---------------------------------------------------------

    @property
    def current(self) -> str | None:
        """The current tenant name, or ``None``."""
        return context.get_tenant()

    @property
    def settings(self) -> Settings:
        """The ``TENANT_JOBS_*`` settings of the current app."""
        return self._state().settings

    @property
    def resolver(self) -> Resolver:
        """The resolver of the current app: reads a request's tenant, and
        ``resolver.address(name)`` says how a request names tenant ``name``."""
        return self._state().resolver

    @property
    def celery(self) -> TenantCelery:
        """The Celery app of the current app, built from ``app.config["CELERY"]``."""
        celery_app = self._state().celery
        if celery_app is None:
            raise ConfigurationError(
                "No Celery app: set app.config['CELERY'] to a dict of Celery settings, e.g. "
                "{'broker_url': 'redis://127.0.0.1:6379/0'}, before 'init_app'."
            )
        return celery_app

    def validate(self, name: object) -> str:
        """Return ``name`` if it is a tenant that can be entered now, else raise why not.

        Raises ``InvalidTenantNameError``, ``TenantNotFoundError`` or, with the
        schema strategy, ``SchemaNotFoundError``.
        """
        state = self._state()
        tenant = state.registry.require(name)
        state.strategy.check_tenant(tenant)
        return tenant

    @contextmanager
    def switch(self, name: str | None) -> t.Iterator[str | None]:
        """Run the block as tenant ``name`` (``None``: no tenant), then restore the previous one.

        Raises ``InvalidTenantNameError`` for a malformed name and
        ``TenantNotFoundError`` for an unknown tenant, before anything changes.
        """
        if name is not None:
            name = self.validate(name)
        entered = self._enter(name)
        try:
            yield name
        except GeneratorExit:  # closed late, e.g. by the garbage collector: if other code
            context.leave_if_current(entered)  # switched since, its tenant stays
            raise
        except BaseException:
            context.leave(entered)
            raise
        else:
            context.leave(entered)

    def reset(self) -> None:
        """Clear the current tenant in this context."""
        context.clear()

    def without_tenant(self) -> t.ContextManager[None]:
        """Context manager for deliberate cross-tenant work: scoped queries are not filtered."""
        return context.unscoped()

    def each(self) -> TenantIterator:
        """Iterate over all tenants, switched into each in turn.

        In a direct ``for`` loop the previous tenant comes back when the loop ends,
        breaks or raises. Bound to a variable, close it (``with tenant_jobs.each() as
        tenants:``); :meth:`call_for_each_tenant` cannot leave a tenant behind at all.
        """
        return TenantIterator(self.tenant_names(), self._enter_known)

    def call_for_each_tenant(self, func: t.Callable[[str], T]) -> dict[str, T]:
        """Call ``func(name)`` switched into each tenant in turn; return the results by name.

        Each call runs inside :meth:`switch`, so no tenant is left behind whatever
        ``func`` does, on every Python implementation.
        """
        results: dict[str, T] = {}
        for name in self.tenant_names():
            with self.switch(name):
                results[name] = func(name)
        return results

    # -- the tenants ----------------------------------------------------------------

    def tenant_names(self) -> list[str]:
        """All tenant names, sorted."""
        return list(self._state().registry.names())

    def exists(self, name: object) -> bool:
        """Whether ``name`` is a known tenant (``False`` for malformed names)."""
        return self._state().registry.exists(name)

    def create(self, name: str) -> list[str]:
        """Create tenant ``name``'s storage (schema strategy: its schema and tables, or
        with Flask-Migrate its schema and the Alembic migrations run to head).

        Returns the tables made (none with the column strategy). It does not make
        the tenant known: add the name to the ``TENANT_JOBS_TENANTS`` source too;
        the cache is refreshed so that it is seen at once. Sends ``tenant_created``.
        """
        return self._change_storage(
            name, lambda strategy, tenant: strategy.create(tenant), signals.tenant_created
        )

    def drop(self, name: str) -> dict[str, int]:
        """Remove tenant ``name``'s data; return the rows removed per table.

        Column strategy: its rows in every ``TenantScoped`` table, in one
        transaction of its own (end the session's transaction first). Schema
        strategy: its schema and everything in it. Sends ``tenant_dropped``.
        """
        return self._change_storage(
            name, lambda strategy, tenant: strategy.drop(tenant), signals.tenant_dropped
        )

    def migrate(self, name: str) -> None:
        """Bring tenant ``name``'s storage up to date.

        Schema strategy: create the missing tables of its schema or, with
        Flask-Migrate, run the Alembic migrations to head in it.
        """
        state = self._state()
        state.strategy.migrate(state.registry.require(name))

    def check_storage(self) -> list[str]:
        """What is wrong with the tenants' storage, each with what to do about it.

        Schema strategy: tenant tables in the shared schema. ``init_app`` logs these
        as warnings and ``flask tenant-jobs migrate`` prints them.
        """
        return self._state().strategy.check_storage()

    def describe(self, name: str) -> dict[str, str]:
        """Facts about tenant ``name``'s storage (schema strategy: schema, whether it exists)."""
        return self._state().strategy.describe(validate_name(name))

    def refresh(self, older_than: float = 0.0) -> bool:
        """Forget the cached tenant names so the next lookup reads ``TENANT_JOBS_TENANTS``.

        With ``older_than``, only names read more than that many seconds ago are
        forgotten. Returns whether they were.
        """
        return self._state().registry.invalidate(older_than)

    # -- fair dispatch ----------------------------------------------------------------

    def backlog(self, queue: str | None = None) -> dict[str, int]:
        """Tenant tasks waiting in ``queue`` (default: Celery's default queue), per tenant:
        ready, held back by a limit, or not due yet. Needs ``TENANT_JOBS_FAIR_DISPATCH``."""
        from .fair import setup as fair

        return fair.backlog(self.celery, queue)

    def queue_rows(self, queue: str | None = None) -> list[QueueRow]:
        """Per tenant of ``queue``: tasks waiting, held back, scheduled and running under a
        limit (what ``flask tenant-jobs queues`` shows)."""
        from .fair import setup as fair

        return fair.queue_rows(self.celery, queue)

    # -- row-level security (PostgreSQL) ----------------------------------------------

    def enable_rls(self) -> list[str]:
        """Protect every ``TenantScoped`` table with the ``tenant_jobs_isolation`` policy.

        Idempotent; run it as the tables' owner. Returns the tables' names.
        """
        state = self._state()
        return rls.enable(state.db, state.settings)

    def disable_rls(self) -> list[str]:
        """Undo :meth:`enable_rls` on every ``TenantScoped`` table; return their names."""
        state = self._state()
        return rls.disable(state.db, state.settings)

    def check_rls(self) -> list[str]:
        """What leaves tenant rows unprotected by row-level security, each with what to do:
        unprotected tables, and a connecting role that skips policies. Empty when all is well.
        """
        state = self._state()
        return rls.check(state.db, state.settings)

    def refresh_workers(self, timeout: float = 1.0) -> list[str]:
        """Make every Celery worker of this app (and its pool processes) read
        ``TENANT_JOBS_TENANTS`` again before its next task; refresh this process too.

        A remote-control broadcast: returns the names of the workers that answered
        within ``timeout`` seconds. Ends a removed tenant's cache window at once.
        """
        self.refresh()
        replies = self.celery.control.broadcast(REFRESH_COMMAND, reply=True, timeout=timeout)
        return sorted(name for reply in replies or () for name in reply)

    # -- internals --------------------------------------------------------------------

    def _state(self) -> _AppState:
        """The state of the current app (or of the only app, with no app context pushed)."""
        app = self._app()
        found = self._states.get(app)
        if found is None:
            extension_of(app)  # raises when the app has no TenantJobs at all
            raise ConfigurationError(
                f"App {app.name!r} is set up with another TenantJobs instance: use that one "
                "(app.extensions['tenant_jobs'])."
            )
        return found

    def _app(self) -> Flask:
        """The current app, or the only app when no app context is pushed."""
        if has_app_context():
            return t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
        if len(self._states) == 1:
            return next(iter(self._states))
        raise RuntimeError("No Flask app context: run this inside 'with app.app_context():'.")

    def _change_storage(
        self, name: str, change: t.Callable[[Strategy, str], T], announce: NamedSignal
    ) -> T:
        """Make ``change`` to tenant ``name``'s storage, read the tenant names afresh so the
        change is seen at once, and send ``announce``."""
        state = self._state()
        tenant = validate_name(name)
        result = change(state.strategy, tenant)
        state.registry.invalidate()
        announce.send(self._app(), tenant=tenant)
        return result

    def _enter_known(self, name: str) -> context.Entered:
        """Validate ``name``, make it current and announce it."""
        return self._enter(self.validate(name))

    def _enter(self, name: str | None, starting: bool = False) -> context.Entered:
        """Make ``name`` current and announce it; return what restores the previous.

        ``starting``: a request starts, so the unscoped flag is turned off too.
        """
        if not signals.tenant_switched.receivers:
            return context.start(name) if starting else context.enter(name)
        previous = context.get_tenant()
        token = context.start(name) if starting else context.enter(name)
        if has_app_context():
            signals.tenant_switched.send(
                current_app._get_current_object(),  # type: ignore[attr-defined]
                tenant=name,
                previous=previous,
            )
        return token

    def _resolve_request(self, app: Flask, state: _AppState) -> None:
        """Before each request: resolve the tenant onto ``g.tenant``, or answer 404.

        The request starts with no tenant and scoping on, whatever the caller had (a
        test inside ``switch``, a ``without_tenant()`` block left open), so
        ``current_tenant()`` is ``g.tenant`` throughout; the token taken here restores
        the caller's state when the request ends.
        """
        candidate = state.resolver(request._get_current_object())  # type: ignore[attr-defined]
        tenant = None if candidate is None else self._known_or_404(app, state, candidate)
        token = context.start(None) if tenant is None else self._enter(tenant, starting=True)
        # one write for both names: each g.name = value is a call of g's __setattr__
        g._get_current_object().__dict__.update({"tenant": tenant, _REQUEST_TOKEN: token})
        if tenant is not None and signals.tenant_resolved.receivers:
            signals.tenant_resolved.send(app, tenant=tenant)

    def _known_or_404(self, app: Flask, state: _AppState, candidate: str) -> str:
        """``candidate`` if it is a tenant that can be entered; otherwise answer 404."""
        if state.registry.exists(candidate):
            try:
                state.strategy.check_tenant(candidate)
                return candidate
            except TenantError:
                pass
        signals.tenant_not_found.send(app, tenant=candidate, source="request")
        raise responses.TenantNotFound(responses.NO_SUCH_TENANT)

    def _end_request(self, exc: BaseException | None) -> None:
        """After each request, also a failed one: restore the tenant (and the unscoped flag)
        of before."""
        token = g._get_current_object().__dict__.pop(_REQUEST_TOKEN, None)
        if token is not None:
            context.leave(token)


def current_tenant() -> str | None:
    """The current tenant name, or ``None``: in a request, inside ``switch`` and in a task."""
    return context.get_tenant()


def _refuse_what_cannot_be_installed(app: Flask, db: SQLAlchemy, settings: Settings) -> None:
    """Raise ``ConfigurationError`` before ``init_app`` changes anything, so that once the
    configuration is fixed it can be called again."""
    if settings.rls:
        rls.require_driver(app, db)
    if not settings.shared_session:
        require_bindable(app)


def _warn_about_storage(app: Flask, strategy: Strategy) -> None:
    """Log what is wrong with the storage of the models known now; skip an unreachable database."""
    try:
        with app.app_context():
            problems = strategy.check_storage()
    except SQLAlchemyError:
        return
    for problem in problems:
        app.logger.warning(problem)
