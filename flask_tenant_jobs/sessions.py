"""Flask sessions that belong to their tenant.

A tenant's request keeps its session in a cookie of its own, named after
``SESSION_COOKIE_NAME`` and the tenant (``session.acme``) and signed with a
salt that names the tenant. On globex's host, acme's cookie is not read (its
value copied under globex's name fails the signature and reads as empty), and
globex's response only ever sets or deletes ``session.globex``: acme's session
survives the visit, also where ``SESSION_COOKIE_DOMAIN`` sends every cookie to
every tenant's host. A request with no tenant keeps Flask's own cookie.

One cookie per tenant, rather than one cookie holding every tenant's session,
means that no tenant's response ever re-sends another tenant's data, that two
tenants open in two tabs cannot overwrite each other's session, and that each
session has the browser's whole 4 KB to itself.
"""

from __future__ import annotations

import typing as t
from weakref import WeakKeyDictionary

from flask import Flask, Request, Response, has_request_context, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from itsdangerous import URLSafeTimedSerializer, want_bytes

from .errors import ConfigurationError
from .registry import TenantRegistry
from .resolvers import Resolver
from .state import extension_of

#: The session owner of a request that names no known tenant (it answers 404):
#: nothing is read or saved. It is not a DNS label, so never a tenant's name.
NO_SUCH_TENANT: t.Final = "?"
_OWNER = "_tenant_jobs_session_owner"
_UNSET = object()

RequestOwner = t.Callable[[Request], str | None]
_owners: WeakKeyDictionary[Flask, RequestOwner] = WeakKeyDictionary()


class TenantSessionInterface(SecureCookieSessionInterface):
    """Flask's cookie sessions, one cookie per tenant, each signed for its tenant.

    Installed by ``TenantJobs.init_app`` in place of Flask's default. To keep a
    ``SecureCookieSessionInterface`` subclass of your own, set one that derives
    from both: ``class Sessions(TenantSessionInterface, MySessions)``.
    """

    def get_cookie_name(self, app: Flask) -> str:
        """``SESSION_COOKIE_NAME``; in a tenant's request, followed by ``.`` and the tenant."""
        name = super().get_cookie_name(app)
        owner = session_owner(app)
        return name if owner is None else f"{name}.{owner}"

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        """Flask's serializer; in a tenant's request, its salt names the tenant too."""
        serializer = super().get_signing_serializer(app)
        if serializer is None:
            return None
        owner = session_owner(app)
        if owner is not None:
            serializer.salt = want_bytes(serializer.salt or b"") + f"|tenant:{owner}".encode()
        return serializer

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        """The session of the request's tenant; an empty one if it names no known tenant."""
        if not app.secret_key:
            return None  # as Flask: no signing serializer, so a null session
        if session_owner(app) == NO_SUCH_TENANT:
            return self.session_class()
        return super().open_session(app, request)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """Save as Flask does, except for a request that names no known tenant."""
        if session_owner(app) != NO_SUCH_TENANT:
            super().save_session(app, session, response)


def session_owner(app: Flask) -> str | None:
    """The tenant whose session the current request uses (``None``: no tenant's).

    Asked before the tenant is resolved (Flask opens the session first), so it
    resolves the request itself, once; outside a request it is ``None``.
    """
    if not has_request_context():
        return None
    current = request._get_current_object()  # type: ignore[attr-defined]
    memo = current.__dict__
    owner = memo.get(_OWNER, _UNSET)
    if owner is _UNSET:
        owner_of = _owners.get(app)
        if owner_of is None:
            extension_of(app)  # no TenantJobs at all: the error says how to set it up
            raise ConfigurationError(
                f"TenantSessionInterface is set on app {app.name!r}, whose "
                "'TENANT_JOBS_SHARED_SESSION' is True: set it to False, or keep Flask's "
                "SecureCookieSessionInterface."
            )
        owner = memo[_OWNER] = owner_of(current)
    return t.cast("str | None", owner)


def bind_sessions(app: Flask, registry: TenantRegistry, resolver: Resolver) -> None:
    """Give ``app`` sessions bound to their tenant (``TENANT_JOBS_SHARED_SESSION`` off).

    :func:`require_bindable` has checked the session interface; one set after this
    call is checked at the first request.
    """
    if type(app.session_interface) is SecureCookieSessionInterface:
        app.session_interface = TenantSessionInterface()

    def owner_of(request: Request) -> str | None:
        try:
            candidate = resolver(request)
            if candidate is None or registry.exists(candidate):
                return candidate
        except Exception:  # e.g. a Host that Werkzeug refuses: the resolve hook answers it
            pass
        return NO_SUCH_TENANT

    def check_session_interface_once() -> None:
        """At the first request: the interface may have been replaced after ``init_app``."""
        _require_bound(app.session_interface)
        hooks = app.before_request_funcs[None]
        app.before_request_funcs[None] = [h for h in hooks if h is not check_session_interface_once]

    _owners[app] = owner_of
    app.before_request(check_session_interface_once)


def require_bindable(app: Flask) -> None:
    """Raise ``ConfigurationError`` unless ``bind_sessions`` can bind ``app``'s sessions:
    Flask's default interface (replaced) or a ``TenantSessionInterface``."""
    if type(app.session_interface) is not SecureCookieSessionInterface:
        _require_bound(app.session_interface)


def _require_bound(interface: object) -> None:
    """Raise ``ConfigurationError`` unless ``interface`` binds sessions to their tenant."""
    if isinstance(interface, TenantSessionInterface):
        return
    name = type(interface).__name__
    raise ConfigurationError(
        f"app.session_interface is a {name}, which flask-tenant-jobs cannot bind to a tenant, "
        "so one tenant's session would be read on another tenant's host. A subclass of "
        "Flask's SecureCookieSessionInterface: set 'class Sessions(TenantSessionInterface, "
        f"{name})' from flask_tenant_jobs.sessions instead. Other sessions (e.g. server-side): "
        "store the tenant in the session, compare it with g.tenant on every request and set "
        "TENANT_JOBS_SHARED_SESSION = True."
    )
