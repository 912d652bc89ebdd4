"""``flask tenant-jobs ...``: the Celery worker and beat of this app, and tenant lifecycle."""

from __future__ import annotations

import typing as t
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

import click
from celery import maybe_patch_concurrency
from flask import Flask, current_app
from flask.cli import AppGroup, ScriptInfo

from .errors import TenantError
from .registry import validate_name

tenant_jobs_cli = AppGroup("tenant-jobs", help="Tenants, and the Celery worker and beat.")

_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _load_app(ctx: click.Context) -> Flask:
    return ctx.ensure_object(ScriptInfo).load_app()


def _extension(app: Flask) -> t.Any:
    try:
        return app.extensions["tenant_jobs"]
    except KeyError:  # the command is a Flask plugin: it is offered for every app
        raise click.ClickException(
            f"TenantJobs is not set up on app {app.name!r}: call 'tenant_jobs.init_app(app)'."
        ) from None


def _run_celery(ctx: click.Context, command: str, celery_args: tuple[str, ...]) -> None:
    """Start a Celery sub-command on this app's Celery app; errors become one line."""
    with _one_line_errors():
        celery_app = _extension(_load_app(ctx)).celery
    celery_app.start(argv=[command, *celery_args])


@tenant_jobs_cli.command("worker", context_settings=_PASS_THROUGH, with_appcontext=False)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def worker_command(ctx: click.Context, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker for this app; other arguments go to Celery (-P, -c, -Q, -l ...)."""
    _patch_for_pool(ctx, celery_args)
    _run_celery(ctx, "worker", celery_args)


def _patch_for_pool(ctx: click.Context, celery_args: tuple[str, ...]) -> None:
    """Monkey-patch for ``-P gevent``/``-P eventlet`` before the app is loaded.

    The ``celery`` command does this first thing in its ``main()``; a worker started
    through ``flask`` must do it itself, or the gevent pool never yields to its
    consumer (the worker says "ready" and serves nothing, not even a ping), and locks
    and pools the app makes before the patch block every greenlet at once. The
    ``flask.commands`` entry point lets Flask find this command without loading the
    app first.
    """
    pool = _pool_option(celery_args)
    if pool not in ("gevent", "eventlet"):
        return
    if ctx.ensure_object(ScriptInfo)._loaded_app is not None:
        click.echo(
            f"Warning: the app was loaded before the {pool} monkey-patching; reinstall "
            "flask-tenant-jobs so that Flask finds 'tenant-jobs' through its entry point.",
            err=True,
        )
    maybe_patch_concurrency(["celery", "worker", "-P", pool])


def _pool_option(celery_args: tuple[str, ...]) -> str | None:
    """The value of Celery's ``-P``/``--pool`` option in ``celery_args``, if any."""
    for i, arg in enumerate(celery_args):
        if arg in ("-P", "--pool"):
            return celery_args[i + 1] if i + 1 < len(celery_args) else None
        if arg.startswith("--pool="):
            return arg.partition("=")[2]
        if arg.startswith("-P"):
            return arg[2:]
    return None


@tenant_jobs_cli.command("beat", context_settings=_PASS_THROUGH, with_appcontext=False)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def beat_command(ctx: click.Context, celery_args: tuple[str, ...]) -> None:
    """Run Celery beat for this app; tenant tasks run once per tenant at each tick."""
    _run_celery(ctx, "beat", celery_args)


@tenant_jobs_cli.command("list")
def list_command() -> None:
    """List the tenants, one per line, with their storage (schema, exists, revision)."""
    extension = _extension(current_app)
    with _one_line_errors():
        for name in extension.tenant_names():
            facts = extension.describe(name)
            click.echo("  ".join([name, *(f"{k}={v}" for k, v in facts.items())]))


@tenant_jobs_cli.command("create")
@click.argument("name")
def create_command(name: str) -> None:
    """Create tenant NAME's storage (schema strategy: its schema, then its tables or migrations)."""
    with _one_line_errors():
        _extension(current_app).create(name)
    click.echo(f"created {name}")


@tenant_jobs_cli.command("drop")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def drop_command(name: str, yes: bool) -> None:
    """Drop tenant NAME's storage (schema strategy: its schema and all its data)."""
    with _one_line_errors():
        validate_name(name)
        if not yes:
            click.confirm(f"Drop tenant {name!r} and all its data?", abort=True)
        _extension(current_app).drop(name)
    click.echo(f"dropped {name}")


@tenant_jobs_cli.command("migrate")
@click.option("--tenant", "only", metavar="NAME", help="Migrate this tenant only.")
@click.option(
    "--jobs",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tenants migrated in parallel (Alembic migrations still run one at a time).",
)
def migrate_command(only: str | None, jobs: int) -> None:
    """Bring every tenant's storage up to date; a failed tenant does not stop the others.

    Schema strategy: create the missing tables of each tenant's schema or, with
    Flask-Migrate, run the Alembic migrations to head in each tenant's schema.
    """
    extension = _extension(current_app)
    with _one_line_errors():
        names = [extension.validate(only)] if only is not None else extension.tenant_names()
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def migrate_one(name: str) -> str | None:
        with app.app_context():
            try:
                extension.migrate(name)
            except Exception as error:  # reported per tenant, then summed up
                first_line = str(error).strip().split("\n", 1)[0]
                return f"{type(error).__name__}: {first_line}"
        return None

    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(migrate_one, name): name for name in names}
        for future in as_completed(futures):
            name, error = futures[future], future.result()
            click.echo(f"{name}: {'failed: ' + error if error else 'ok'}")
            if error:
                failed.append(name)
    click.echo(f"migrated {len(names) - len(failed)} of {len(names)} tenants")
    if failed:
        raise click.ClickException(f"failed tenants: {', '.join(sorted(failed))}")


@tenant_jobs_cli.group("rls")
def rls_group() -> None:
    """Row-level security of the tenant tables (PostgreSQL, column strategy)."""


@rls_group.command("enable")
def rls_enable_command() -> None:
    """Protect every tenant table with row-level security (run it as the tables' owner)."""
    with _one_line_errors():
        names = _extension(current_app).enable_rls()
    click.echo(f"row-level security enabled on {len(names)} tables: {', '.join(names)}")


@rls_group.command("disable")
def rls_disable_command() -> None:
    """Remove the row-level security that 'rls enable' added."""
    with _one_line_errors():
        names = _extension(current_app).disable_rls()
    click.echo(f"row-level security disabled on {len(names)} tables: {', '.join(names)}")


@rls_group.command("check")
def rls_check_command() -> None:
    """Name each unprotected tenant table and a role that skips policies; exit 1 if any."""
    with _one_line_errors():
        problems = _extension(current_app).check_rls()
    for problem in problems:
        click.echo(problem)
    if problems:
        raise click.exceptions.Exit(1)
    click.echo("row-level security: every tenant table is protected")


@contextmanager
def _one_line_errors() -> t.Iterator[None]:
    """Turn a tenant error into one clear line and a non-zero exit."""
    try:
        yield
    except TenantError as error:
        raise click.ClickException(str(error)) from None
