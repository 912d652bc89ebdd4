"""``flask tenant-jobs ...``: run the Celery worker and beat of this app, list tenants."""

from __future__ import annotations

import typing as t

import click
from flask import Flask
from flask.cli import AppGroup, ScriptInfo

from .errors import TenantError

tenant_jobs_cli = AppGroup("tenant-jobs", help="Tenants, and the Celery worker and beat.")

_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _load_app(ctx: click.Context) -> Flask:
    return ctx.ensure_object(ScriptInfo).load_app()


def _extension(app: Flask) -> t.Any:
    return app.extensions["tenant_jobs"]


def _run_celery(ctx: click.Context, command: str, celery_args: tuple[str, ...]) -> None:
    """Start a Celery sub-command on this app's Celery app; errors become one line."""
    try:
        celery_app = _extension(_load_app(ctx)).celery
    except TenantError as error:
        raise click.ClickException(str(error)) from None
    celery_app.start(argv=[command, *celery_args])


@tenant_jobs_cli.command("worker", context_settings=_PASS_THROUGH, with_appcontext=False)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def worker_command(ctx: click.Context, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker for this app; other arguments go to Celery (-P, -c, -Q, -l ...)."""
    _run_celery(ctx, "worker", celery_args)


@tenant_jobs_cli.command("beat", context_settings=_PASS_THROUGH, with_appcontext=False)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def beat_command(ctx: click.Context, celery_args: tuple[str, ...]) -> None:
    """Run Celery beat for this app; tenant tasks run once per tenant at each tick."""
    _run_celery(ctx, "beat", celery_args)


@tenant_jobs_cli.command("list")
def list_command() -> None:
    """List the tenants, one per line."""
    from flask import current_app

    try:
        names = _extension(current_app).tenant_names()
    except TenantError as error:
        raise click.ClickException(str(error)) from None
    for name in names:
        click.echo(name)
