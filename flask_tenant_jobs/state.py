"""Where an app's ``TenantJobs`` is found: the one lookup, and the one error when it is missing.

``init_app`` stores the extension as ``app.extensions["tenant_jobs"]`` through
:func:`register`, which refuses a second one on the same app (its hooks would
run twice). Everything else finds it with :func:`extension_of`, whose error says
how to set it up.
"""

from __future__ import annotations

import typing as t

from flask import Flask, current_app, has_app_context

from .errors import ConfigurationError

if t.TYPE_CHECKING:
    from .extension import TenantJobs

#: The key of ``app.extensions`` that holds the extension.
KEY: t.Final = "tenant_jobs"


def register(app: Flask, extension: TenantJobs) -> None:
    """Store ``extension`` on ``app``; raise ``ConfigurationError`` if one is there already."""
    if KEY in app.extensions:
        raise ConfigurationError(
            f"A 'TenantJobs' instance has already been set up on app {app.name!r}: call "
            "'init_app' once per app, and use that instance (app.extensions['tenant_jobs']) "
            "everywhere else."
        )
    app.extensions[KEY] = extension


def find_extension(app: Flask | None = None) -> TenantJobs | None:
    """The ``TenantJobs`` of ``app`` (default: the current app), or ``None``."""
    extensions = (current_app if app is None else app).extensions
    return t.cast("TenantJobs | None", extensions.get(KEY))


def current_tenant_app() -> Flask | None:
    """The current Flask app when it uses ``TenantJobs``, else ``None`` (also with no app
    context); one lookup of the current app, which is a proxy and not free."""
    if not has_app_context():
        return None
    app = t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    return app if KEY in app.extensions else None


def extension_of(app: Flask | None = None) -> TenantJobs:
    """The ``TenantJobs`` of ``app`` (default: the current app); raise
    ``ConfigurationError`` saying how to set it up when there is none."""
    extension = find_extension(app)
    if extension is None:
        name = (current_app if app is None else app).name
        raise ConfigurationError(
            f"TenantJobs is not set up on app {name!r}: call "
            "'tenant_jobs.init_app(app, db=db)'."
        )
    return extension
