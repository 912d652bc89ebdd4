"""The sending side of tenant jobs: what happens when a tenant task is sent.

The Celery app of a Flask app (:func:`make_celery`, :class:`TenantCelery`), the
message header that carries the tenant (:func:`header_name`), and
:func:`stamp_options`, the one function every sent tenant task goes through:
``TenantTask.apply_async``/``apply`` and ``TenantCelery.send_task`` (so also
canvas steps, retries, ``replace()``, beat and ``apply_for_each_tenant``) call it
to name the tenant in the message's headers and in copies of its
``link``/``link_error``/``chord`` signatures, and, with ``TENANT_JOBS_SIGNING_KEY``,
to sign it for the message's task id (:mod:`flask_tenant_jobs.signing`). What the
worker does with the headers is in :mod:`flask_tenant_jobs.worker`.
"""

from __future__ import annotations

import typing as t
from contextlib import nullcontext
from functools import cache
from weakref import WeakKeyDictionary

from celery import Celery, Task
from celery.app import backends
from celery.canvas import Signature
from celery.utils import uuid
from celery.utils.functional import maybe_list
from flask import Flask, has_app_context

from . import context, limits, signals
from .errors import ConfigurationError, NoTenantError
from .registry import validate_name
from .results import tenant_backend_class
from .settings import Settings
from .signing import Signer, signature_header
from .state import current_tenant_app, extension_of

if t.TYPE_CHECKING:
    from .tasks import TenantTask

    WrappedTask = t.Callable[[Celery, object, object], "tuple[TenantTask, object] | None"]

DEFAULT_HEADER = "tenant_for_job"
#: The ``broker_transport`` fair dispatch selects (see flask_tenant_jobs/fair/setup.py).
FAIR_TRANSPORT = "flask_tenant_jobs.fair.transport:FairTransport"
#: Celery's built-in tasks that run another task's body in place: ``task.map()``,
#: ``task.starmap()`` and ``task.chunks()`` send them, with the task's signature in
#: their ``task`` argument.
WRAPPER_TASKS = frozenset({"celery.map", "celery.starmap", "celery.chunks"})
#: The Flask apps ``TenantJobs`` was set up on (for Celery apps not made by it), and
#: the signer of each (``None``: tenant headers are not signed).
_FLASK_APPS: WeakKeyDictionary[Flask, Signer | None] = WeakKeyDictionary()


def send_hint(header: str) -> str:
    """What to do when a tenant task is sent with no tenant current."""
    return (
        "send it inside 'tenant_jobs.switch(name)' or a tenant request, name the tenant "
        f"with headers={{{header!r}: name}}, or send it to every tenant with "
        "'delay_for_each_tenant()'."
    )


class WrapperStampingTask(Task):  # type: ignore[misc]
    """The task class of a ``TenantCelery``'s own tasks: Celery's ``celery.map``/
    ``starmap``/``chunks`` wrappers of a tenant task are stamped when run in place
    (``apply()``, eager mode) as when sent, so that a signed tenant checks out."""

    def apply(self, args: t.Any = None, kwargs: t.Any = None, **options: t.Any) -> t.Any:
        """Run the task here and now; a wrapper of a tenant task carries its tenant."""
        if self.name in WRAPPER_TASKS:
            options = self.app.stamp_tenant(self.name, options, kwargs, sent=False)
        return super().apply(args, kwargs, **options)


class TenantCelery(Celery):  # type: ignore[misc]
    """A Celery app tied to one Flask app; ``send_task`` stamps tenant tasks too."""

    task_cls = WrapperStampingTask

    flask_app: Flask
    tenant_header: str
    tenant_signer: Signer | None

    def _get_backend(self) -> t.Any:
        """Celery's result backend, storing the tenant with each task's result."""
        backend_class, url = backends.by_url(
            self.backend_cls or self.conf.result_backend, self.loader
        )
        return tenant_backend_class(backend_class)(app=self, url=url)

    def send_task(
        self, name: str, args: t.Any = None, kwargs: t.Any = None, **options: t.Any
    ) -> t.Any:
        """Send a task by name; a registered tenant task carries the current tenant."""
        return super().send_task(
            name, args, kwargs, **self.stamp_tenant(name, options, kwargs)
        )

    def stamp_tenant(
        self, name: str, options: dict[str, t.Any], kwargs: t.Any = None, sent: bool = True
    ) -> dict[str, t.Any]:
        """``options`` for sending task ``name``: a tenant task's headers name its tenant.

        An explicit tenant header is validated, as in ``apply_async``. Options that
        ``TenantTask.apply_async`` already stamped (it passes ``task_type``) are kept.
        A ``celery.map``/``starmap``/``chunks`` wrapper of a tenant task (``kwargs``
        holds its signature) carries the tenant that signature names, else the
        current one, like the tenant task itself. ``sent``: as in :func:`stamp_options`.
        """
        tenant_task_class, wrapped_task = _tasks_module_names()
        if isinstance(options.get("task_type"), tenant_task_class):
            return options
        task = self.tasks.get(name)
        if isinstance(task, tenant_task_class):
            return stamp_options(task, options, sent)
        wrapped = wrapped_task(self, name, kwargs)
        if wrapped is None:
            return options
        inner, tenant = wrapped
        headers = options.get("headers") or {}
        if tenant is not None and self.tenant_header not in headers:
            options = {**options, "headers": {**headers, self.tenant_header: tenant}}
        return stamp_options(inner, options, sent, sent_as=name)


@cache
def _tasks_module_names() -> tuple[type[TenantTask], WrappedTask]:
    """``TenantTask`` and ``wrapped_task`` of :mod:`flask_tenant_jobs.tasks`, which imports
    this module: imported on first use, once (an import statement per send is not free)."""
    from .tasks import TenantTask, wrapped_task

    return TenantTask, wrapped_task


def make_celery(app: Flask, settings: Settings) -> TenantCelery:
    """Build the Celery app of ``app`` from ``app.config["CELERY"]`` (Flask's pattern)."""
    celery_app = TenantCelery(app.import_name)
    celery_app.config_from_object(app.config["CELERY"])
    if "beat_scheduler" not in app.config["CELERY"]:
        celery_app.conf.beat_scheduler = "flask_tenant_jobs.beat:TenantScheduler"
    backend = str(app.config["CELERY"].get("result_backend") or "")
    if backend.startswith("db+") and "result_extended" not in app.config["CELERY"]:
        celery_app.conf.result_extended = True  # where the database backend keeps a tenant
    celery_app.flask_app = app
    celery_app.tenant_header = settings.header
    celery_app.tenant_signer = make_signer(settings)
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def stamp_options(
    task: Task, options: dict[str, t.Any], sent: bool = True, sent_as: str | None = None
) -> dict[str, t.Any]:
    """``options`` for sending (or running) tenant task ``task``: headers naming a known
    tenant (the one in ``headers``, checked, else the current one), and copies of the
    ``link``/``link_error``/``chord`` signatures that carry it.

    With a signing key, the headers also sign the tenant for the task's id (made here,
    as Celery would, when ``task_id`` is not given) and name (``sent_as`` or the task's).

    ``sent``: the task is being sent (``task_enqueued`` fires, naming ``sent_as`` or
    the task), not run by ``apply()`` (which eager ``apply_async`` also ends in: the
    signal fires once). The caller's signatures are never changed: copies carry the
    tenant. Raises ``NoTenantError`` when there is no tenant to name.
    """
    celery_app = task.app  # a property of Celery's Task: read once
    _require_tenant_celery(task, celery_app)
    header = header_name(celery_app)
    headers = dict(options.get("headers") or {})
    tenant = headers.get(header)
    if tenant is None:
        tenant = context.get_tenant()
        if tenant is None:
            raise NoTenantError(f"Sending the tenant task {task.name!r}", send_hint(header))
    else:
        with app_context_of(celery_app):
            tenant = extension_of(flask_app_of(celery_app)).validate(tenant)
    headers[header] = tenant
    signer = signer_of(celery_app)
    if signer is not None:
        options = {**options, "task_id": options.get("task_id") or uuid()}
        headers[signature_header(header)] = signer.sign(
            sent_as or task.name, options["task_id"], tenant
        )
    if sent:
        _stamp_limit(task, headers)
    stamped = {
        key: _stamped_copies(options[key], header, tenant)
        for key in ("link", "link_error", "chord")
        if options.get(key)
    }
    if sent and signals.task_enqueued.receivers:
        signals.task_enqueued.send(
            flask_app_of(celery_app), task=sent_as or task.name, tenant=tenant
        )
    return {**options, **stamped, "headers": headers}


def _stamp_limit(task: Task, headers: dict[str, t.Any]) -> None:
    """Give a task with per-tenant limits the header the fair transport counts it by.

    Limits are enforced by the fair-dispatch transport: sending such a task to a broker
    without it would run it unlimited, so that is refused (eager runs ignore limits).
    """
    limit = limits.limit_of(task)
    if limit is None or task.app.conf.task_always_eager:
        return
    if task.app.conf.broker_transport != FAIR_TRANSPORT:
        raise ConfigurationError(
            f"The task {task.name!r} has a per-tenant limit (tenant_concurrency or "
            "tenant_rate_limit), which the fair-dispatch transport enforces: set "
            "TENANT_JOBS_FAIR_DISPATCH = True (Redis broker), or remove the limit."
        )
    headers[limits.LIMIT_HEADER] = limit.header


def capture_tenant(sig: Signature, header: str, tenant: str) -> None:
    """Give ``sig`` (one just made) the tenant header unless it already names one."""
    headers = sig.options.get("headers") or {}
    if header not in headers:
        sig.options["headers"] = {**headers, header: tenant}


def fan_out_names(
    tenants: t.Iterable[str] | None, pinned: object, where: str
) -> list[str] | None:
    """The tenants a fan-out sends to: ``tenants``, or the one a tenant header pins
    (``None``: every tenant). Raises ``ConfigurationError`` for a single string and for a
    pinned tenant that ``tenants`` contradicts."""
    if isinstance(tenants, str):
        raise ConfigurationError(
            f"{where}: tenants={tenants!r} is a single string: give a list, e.g. "
            f"tenants=[{tenants!r}]."
        )
    names = None if tenants is None else list(tenants)
    if pinned is None:
        return names
    if names is not None and names != [pinned]:
        raise ConfigurationError(
            f"{where}: the headers pin the task to tenant {pinned!r} but tenants={names!r}: "
            "give one of the two (a pinned tenant means that tenant only)."
        )
    return [validate_name(pinned)]


# -- which Flask app a Celery app belongs to ------------------------------------------------


def register_flask_app(app: Flask, settings: Settings) -> None:
    """Remember a Flask app ``TenantJobs`` is set up on, for Celery apps it did not make."""
    _FLASK_APPS[app] = make_signer(settings)


def flask_apps() -> list[Flask]:
    """The Flask apps ``TenantJobs`` is set up on in this process."""
    return list(_FLASK_APPS)


def flask_app_of(celery_app: Celery) -> Flask:
    """The Flask app a Celery app was made for, else the one it can only belong to."""
    app = find_flask_app(celery_app)
    if app is None:
        raise ConfigurationError(
            f"The Celery app {celery_app.main!r} is not tied to a Flask app using TenantJobs: "
            "use 'tenant_jobs.celery' (built from app.config['CELERY']), set "
            "app.extensions['celery'] to it, or push the Flask app's context."
        )
    return app


def find_flask_app(celery_app: Celery) -> Flask | None:
    """The Flask app of ``celery_app``: the one ``TenantJobs`` made it for; else the current
    app; else the app whose ``extensions["celery"]`` it is, or the only ``TenantJobs`` app
    (Flask's own Celery pattern, ``celery_init_app``). ``None`` when none or ambiguous."""
    app = getattr(celery_app, "flask_app", None) or current_tenant_app()
    if app is not None:
        return t.cast(Flask, app)
    apps = flask_apps()
    owners = [app for app in apps if app.extensions.get("celery") is celery_app]
    candidates = owners or apps
    return candidates[0] if len(candidates) == 1 else None


def header_name(celery_app: Celery) -> str:
    """The message header that carries the tenant for this Celery app."""
    header = getattr(celery_app, "tenant_header", None)
    if header is not None:
        return t.cast(str, header)
    app = find_flask_app(celery_app)
    return str(app.config.get("TENANT_JOBS_HEADER") or DEFAULT_HEADER) if app else DEFAULT_HEADER


def make_signer(settings: Settings) -> Signer | None:
    """The signer of tenant headers that ``settings`` ask for (``None``: not signed)."""
    if settings.signing_key is None:
        return None
    return Signer(settings.signing_key, settings.accept_unsigned)


def signer_of(celery_app: Celery) -> Signer | None:
    """The signer of tenant headers for this Celery app (``None``: not signed)."""
    if isinstance(celery_app, TenantCelery):
        return celery_app.tenant_signer
    app = find_flask_app(celery_app)
    return _FLASK_APPS.get(app) if app is not None else None


def app_context_of(celery_app: Celery) -> t.ContextManager[t.Any]:
    """The Flask app context to look tenants up in: the current one, else a new one."""
    return nullcontext() if has_app_context() else flask_app_of(celery_app).app_context()


def _require_tenant_celery(task: Task, celery_app: Celery) -> None:
    """Refuse to send or run a tenant task through a Celery app that no Flask app owns.

    Without ``app.config["CELERY"]`` (or Flask's own ``celery_init_app`` pattern, which
    sets ``app.extensions["celery"]``) the task would go to Celery's default app, which
    publishes to a broker on localhost, and no worker would restore its tenant.
    """
    owner = current_tenant_app() or flask_app_of(celery_app)
    if "celery" not in owner.extensions:
        raise ConfigurationError(
            f"The tenant task {task.name!r} has no Celery app to go through: set "
            "app.config['CELERY'] to a dict of Celery settings, e.g. {'broker_url': "
            "'redis://127.0.0.1:6379/0'}, before 'tenant_jobs.init_app(app)'."
        )


def _stamped_copies(value: t.Any, header: str, tenant: str) -> t.Any:
    """``value`` (a signature or a list of them) with copies that carry ``tenant``."""
    if isinstance(value, Signature):
        return _stamped_copy(value, header, tenant)
    if isinstance(value, (list, tuple)):
        return [_stamped_copy(sig, header, tenant) for sig in maybe_list(value)]
    return value


def _stamped_copy(sig: t.Any, header: str, tenant: str) -> t.Any:
    """A copy of ``sig`` with the tenant header, unless it already names one (then ``sig``)."""
    if not isinstance(sig, Signature):
        return sig
    headers = sig.options.get("headers") or {}
    if header in headers:
        return sig
    copy = sig.clone()
    copy.options["headers"] = {**headers, header: tenant}
    return copy
