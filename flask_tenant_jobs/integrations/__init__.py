"""Optional integrations with other libraries, one module each.

A module here is imported only when its library is installed (and its setting
leaves it on), so an app without the library pays nothing for it.
"""

from __future__ import annotations

import importlib.util

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from ..settings import Settings


def install_integrations(app: Flask, settings: Settings, db: SQLAlchemy) -> None:
    """Scope ``app``'s caches; put the tenant on its traces, error reports, SQL and metrics.

    Each part is installed only when its library is importable and its setting is on.
    """
    if settings.scope_caches and is_installed("flask_caching"):
        from . import caching

        caching.scope_caches(app)
    if settings.sql_comment:
        from . import sqlcomment

        sqlcomment.install(app, db)
    if settings.otel_attribute and is_installed("opentelemetry.trace"):
        from . import otel

        otel.install(app, settings.otel_attribute)
    if is_installed("sentry_sdk"):
        from . import sentry

        sentry.install()
    if settings.metrics and is_installed("prometheus_client"):
        from . import prometheus

        prometheus.install(app, settings.metrics_max_tenants)


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it, past its parent packages)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False

