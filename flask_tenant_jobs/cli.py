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
    try:
        maybe_patch_concurrency(["celery", "worker", "-P", pool])
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != pool:
            raise
        extra = "flask-tenant-jobs[gevent]" if pool == "gevent" else pool
        raise click.ClickException(
            f"'-P {pool}' needs the {pool} package, which is not installed: "
            f"pip install '{extra}'"
        ) from None


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
    """Create tenant NAME's storage (schema strategy: its schema, then its tables or migrations).

    Says what was made and what is left to do: a tenant is known only once its
    name is in TENANT_JOBS_TENANTS (or the source it reads).
    """
    extension = _extension(current_app)
    with _one_line_errors():
        validate_name(name)
        facts = extension.describe(name)
        made = extension.create(name)
        click.echo(_created(name, facts, made, extension.describe(name)))
        click.echo(_left_to_add(extension, name))


def _created(name: str, before: dict[str, str], made: list[str], after: dict[str, str]) -> str:
    """One line saying what ``create`` made."""
    if "schema" not in after:
        return (
            f"Nothing to create for tenant {name!r}: with the column strategy its rows go in "
            "the shared tables."
        )
    schema = after["schema"]
    revision = f" (migrated to revision {after['revision']})" if "revision" in after else ""
    tables = ", ".join(made) or "none"
    if before.get("exists") != "yes":
        return f"Created schema {schema!r} with its tables: {tables}{revision}."
    if made:
        return f"Schema {schema!r} existed; created its missing tables: {tables}{revision}."
    return f"Schema {schema!r} existed with every table: nothing was created{revision}."


def _left_to_add(extension: t.Any, name: str) -> str:
    """What is left to do after ``create``: make the name known, unless it is already."""
    source = _tenant_source(extension)
    if extension.exists(name):
        return f"{name!r} is in {source}: the tenant is ready."
    return (
        f"Left to do: add {name!r} to {source}. Until then its requests answer 404 and its "
        "tasks are refused."
    )


def _tenant_source(extension: t.Any) -> str:
    """Where tenant names come from, as a user would look for it."""
    if callable(extension.settings.tenants):
        return "the source that TENANT_JOBS_TENANTS reads (e.g. your tenants table)"
    return "the TENANT_JOBS_TENANTS list in the app's config"


@tenant_jobs_cli.command("drop")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def drop_command(name: str, yes: bool) -> None:
    """Delete tenant NAME's data: its rows in every tenant table (column strategy, in one
    transaction) or its schema (schema strategy). Reports the rows removed per table."""
    extension = _extension(current_app)
    with _one_line_errors():
        if not extension.exists(validate_name(name)):
            raise click.ClickException(
                f"Unknown tenant {name!r}: it is not in {_tenant_source(extension)}, so "
                "there is nothing to drop. Drop a tenant before removing its name."
            )
        facts = extension.describe(name)
        if not yes:
            click.confirm(_drop_question(name, facts.get("schema")), abort=True)
        removed = extension.drop(name)
    click.echo(_dropped(name, facts, removed))
    for table, rows in removed.items():
        click.echo(f"  {table}: {rows} {'row' if rows == 1 else 'rows'}")
    click.echo(f"Left to do: remove {name!r} from {_tenant_source(extension)}.")


def _drop_question(name: str, schema: str | None) -> str:
    """What ``drop`` asks before it deletes anything."""
    if schema is None:
        return f"Delete every row of tenant {name!r} from the tenant tables, in one transaction?"
    return f"Drop schema {schema!r} of tenant {name!r} and everything in it?"


def _dropped(name: str, facts: dict[str, str], removed: dict[str, int]) -> str:
    """One line saying what ``drop`` removed (the rows per table follow it)."""
    total, tables = sum(removed.values()), len(removed)
    if "schema" not in facts:
        return f"Deleted tenant {name!r} in one transaction: {total} rows in {tables} tables."
    schema = facts["schema"]
    if facts.get("exists") != "yes":
        return f"Tenant {name!r} had no schema {schema!r}: nothing was dropped."
    return f"Dropped schema {schema!r} of tenant {name!r}: {total} rows in {tables} tables."


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
    Flask-Migrate, run the Alembic migrations to head in each tenant's schema;
    then report tenant tables found in the shared schema. Column strategy:
    nothing per tenant.
    """
    extension = _extension(current_app)
    with _one_line_errors():
        names = [extension.validate(only)] if only is not None else extension.tenant_names()
    if extension.settings.strategy == "column":
        click.echo(
            "Nothing to migrate per tenant with the column strategy: all tenants share the "
            "tables; migrate them once (e.g. 'flask db upgrade')."
        )
        return
    failed = _migrate_each(extension, names, jobs)
    click.echo(f"migrated {len(names) - len(failed)} of {len(names)} tenants")
    for problem in extension.check_storage():
        click.echo(f"Warning: {problem}", err=True)
    if failed:
        raise click.ClickException(f"failed tenants: {', '.join(sorted(failed))}")


def _migrate_each(extension: t.Any, names: list[str], jobs: int) -> list[str]:
    """Migrate ``names``, ``jobs`` at a time, printing a line per tenant; return the failed."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def migrate_one(name: str) -> str | None:
        with app.app_context():
            try:
                extension.migrate(name)
            except Exception as error:  # reported per tenant, then summed up
                return f"{type(error).__name__}: {_first_line(error)}"
        return None

    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(migrate_one, name): name for name in names}
        for future in as_completed(futures):
            name, error = futures[future], future.result()
            click.echo(f"{name}: {'failed: ' + error if error else 'ok'}")
            if error:
                failed.append(name)
    return failed


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (SQLAlchemy's add the SQL and a link)."""
    return str(error).strip().split("\n", 1)[0]


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


@tenant_jobs_cli.command("queues")
@click.option("--queue", "-Q", default=None, help="The queue (default: Celery's default queue).")
def queues_command(queue: str | None) -> None:
    """Show per tenant the tasks waiting, held back by a limit, scheduled and running."""
    with _one_line_errors():
        rows = _extension(current_app).queue_rows(queue)
    header = ("tenant", "waiting", "held back", "scheduled", "running")
    lines = [header, *((r.tenant, *map(str, r[1:])) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(line, widths, strict=True))]  # fmt: skip
        click.echo("  ".join(cells).rstrip())
    if not rows:
        click.echo("no tenant task is waiting")


@contextmanager
def _one_line_errors() -> t.Iterator[None]:
    """Turn a tenant or database error into one clear line and a non-zero exit."""
    # Imported here, not with the module: Flask loads this module before "worker -P gevent"
    # monkey-patches, and every command gets here after that.
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except TenantError as error:
        raise click.ClickException(str(error)) from None
    except SQLAlchemyError as error:
        raise click.ClickException(f"The database refused: {_first_line(error)}") from None
