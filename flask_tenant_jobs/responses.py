"""Answers to requests without a usable tenant: logged 404s, JSON for JSON clients; 503s.

The 404 goes through the app's own 404 handler, answers JSON to JSON
clients, and is logged when it comes from the app's code.

An unknown tenant (a foreign host, a typo) is routine and only answered; a
``NoTenantError`` raised by a view, or a strategy's own error (the schema
strategy's ``SchemaNotFoundError``), means the view reached tenant data where
there is no tenant, and a ``TenantMismatchError`` that it reached another
tenant's (a task result looked up by id), so they are also logged at warning
level with the view and the error's message, which says what to do; the
client learns nothing about the other tenant.
"""

from __future__ import annotations

import json
import typing as t

from flask import Flask, current_app, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import NotFound
from werkzeug.wrappers import Request

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

from .errors import NoTenantError, TenantError, TenantMismatchError, TenantSourceError

#: What the client is told, for each reason there is no tenant.
NO_SUCH_TENANT = "No such tenant."
PAGE_NEEDS_TENANT = "This page belongs to a tenant: use a tenant's address."
#: What the client is told about something of another tenant: nothing about that tenant.
NOT_HERE = "Not found."


class TenantNotFound(NotFound):
    """The 404 of a request without a usable tenant; JSON for clients that want JSON.

    A subclass of ``NotFound``, so an ``@app.errorhandler(404)`` handles it.
    """

    def get_body(
        self, environ: WSGIEnvironment | None = None, scope: dict[str, t.Any] | None = None
    ) -> str:
        """A JSON body for JSON clients, else Werkzeug's HTML page."""
        if not _json_wanted(environ):
            return super().get_body(environ, scope)
        return json.dumps({"error": self.description, "status": self.code})

    def get_headers(
        self, environ: WSGIEnvironment | None = None, scope: dict[str, t.Any] | None = None
    ) -> list[tuple[str, str]]:
        """The content type of the body; the answer depends on ``Accept``."""
        if not _json_wanted(environ):
            return [*super().get_headers(environ, scope), ("Vary", "Accept")]
        return [("Content-Type", "application/json"), ("Vary", "Accept")]


def _json_wanted(environ: WSGIEnvironment | None) -> bool:
    return environ is not None and wants_json(Request(environ))


def wants_json(incoming: Request) -> bool:
    """Whether the client sent JSON or prefers JSON to HTML (``Accept: application/json``)."""
    best = incoming.accept_mimetypes.best_match(["text/html", "application/json"])
    return incoming.is_json or best == "application/json"


def install(app: Flask) -> None:
    """Answer ``NoTenantError`` raised in requests (by scoping or a tenant task) and
    ``TenantMismatchError`` (another tenant's task result) as 404s,
    and ``TenantSourceError`` (no tenant list to check against) as a 503.

    Each strategy answers its own errors with :func:`answer_not_found`.
    """
    answer_not_found(app, NoTenantError, PAGE_NEEDS_TENANT)
    answer_not_found(app, TenantMismatchError, NOT_HERE)
    app.register_error_handler(TenantSourceError, _tenant_source_response)


def answer_not_found(app: Flask, error: type[TenantError], description: str) -> None:
    """Answer ``error`` raised in a view of ``app`` as a 404 saying ``description``,
    logged with the view: the view reached tenant data where there is none."""

    def not_found(raised: TenantError) -> ResponseReturnValue:
        return _not_found(raised, description)

    app.register_error_handler(error, not_found)


def _tenant_source_response(error: TenantSourceError) -> tuple[str, int]:
    """No tenant list can be read (and none recent is left): unavailable, not a 500."""
    return "Tenants cannot be checked right now: try again shortly.", 503


def _not_found(error: TenantError, description: str) -> ResponseReturnValue:
    """Log ``error`` with the view, then answer 404 through the app's own 404 handler."""
    current_app.logger.warning(
        "%s in view %r (%s %s), answered 404: %s",
        type(error).__name__,
        request.endpoint,
        request.method,
        _one_line(request.host + request.path),
        error,
    )
    return current_app.handle_http_exception(TenantNotFound(description))


def _one_line(text: str) -> str:
    """``text`` with control characters escaped: a URL cannot add lines to the log."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
