"""The errors: hierarchy, ``.tenant``, and messages that say what to do."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

import flask_tenant_jobs
from flask_tenant_jobs import TenantJobs, TenantScoped, errors
from flask_tenant_jobs.errors import (
    ConfigurationError,
    InvalidTenantNameError,
    NoTenantError,
    SchemaNotFoundError,
    TenantError,
    TenantImmutableError,
    TenantMismatchError,
    TenantNotFoundError,
)
from flask_tenant_jobs.settings import current_settings
from flask_tenant_jobs.state import extension_of

from .core_app import make_app, tables

db = SQLAlchemy()


class Note(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "err_note"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(40), default="")


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (ConfigurationError, None),
        (InvalidTenantNameError, ValueError),
        (TenantNotFoundError, LookupError),
        (NoTenantError, RuntimeError),
        (TenantMismatchError, None),
        (TenantImmutableError, None),
        (SchemaNotFoundError, LookupError),
    ],
)
def test_every_error_is_a_tenant_error(error: type[Exception], builtin: type | None) -> None:
    assert issubclass(error, TenantError)
    if builtin is not None:
        assert issubclass(error, builtin)
    assert getattr(flask_tenant_jobs, error.__name__) is getattr(errors, error.__name__)


def test_invalid_tenant_name() -> None:
    error = InvalidTenantNameError("Acme Corp")
    assert error.tenant == "Acme Corp"
    assert "'Acme Corp'" in str(error)
    assert "lower-case letters, digits and inner hyphens" in str(error)
    assert "e.g. 'acme'" in str(error)


def test_invalid_tenant_name_that_is_no_string_or_too_long() -> None:
    assert InvalidTenantNameError(42).tenant is None
    long_name = "x" * 5000
    error = InvalidTenantNameError(long_name)
    assert error.tenant == long_name
    assert "..." in str(error) and len(str(error)) < 300


def test_tenant_not_found() -> None:
    error = TenantNotFoundError("umbrella")
    assert error.tenant == "umbrella"
    assert "Unknown tenant 'umbrella'" in str(error)
    assert "add the name to 'TENANT_JOBS_TENANTS' or to the source it reads" in str(error)
    assert "or create it" not in str(error)  # create makes storage; it registers nothing
    assert "'flask tenant-jobs create' only makes a tenant's storage" in str(error)


def test_no_tenant() -> None:
    error = NoTenantError("Querying Note")
    assert error.tenant is None
    assert str(error).startswith("Querying Note needs a current tenant")
    assert "tenant_jobs.switch(name)" in str(error)
    assert "tenant_jobs.without_tenant()" in str(error)


def test_tenant_mismatch() -> None:
    error = TenantMismatchError("globex", "acme", "The new Note")
    assert (error.tenant, error.current) == ("globex", "acme")
    assert "The new Note belongs to tenant 'globex'" in str(error)
    assert "current tenant is 'acme'" in str(error)
    assert "switch to that tenant first" in str(error)


def test_tenant_immutable() -> None:
    error = TenantImmutableError("acme", "globex", "Note")
    assert error.tenant == "acme"
    assert "cannot change to 'globex'" in str(error)
    assert "Copy the data into a new object" in str(error)


def test_schema_not_found() -> None:
    error = SchemaNotFoundError("acme", "tenant_acme")
    assert (error.tenant, error.schema) == ("acme", "tenant_acme")
    assert "'tenant_acme'" in str(error)
    assert "tenant_jobs.create('acme')" in str(error)
    assert "flask tenant-jobs create acme" in str(error)


# -- raised by the library ---------------------------------------------------------------


@pytest.fixture
def note_app(tmp_path: Path) -> t.Iterator[tuple[Flask, TenantJobs]]:
    app, tenant_jobs = make_app(db, f"sqlite:///{tmp_path / 'errors.db'}")
    with tables(app, db), app.app_context():
        yield app, tenant_jobs


def test_switch_errors_carry_the_name(note_app: tuple[Flask, TenantJobs]) -> None:
    _, tenant_jobs = note_app
    with pytest.raises(TenantNotFoundError) as not_found, tenant_jobs.switch("umbrella"):
        pass
    assert not_found.value.tenant == "umbrella"
    with pytest.raises(InvalidTenantNameError) as invalid, tenant_jobs.switch("Umbrella"):
        pass
    assert invalid.value.tenant == "Umbrella"


def test_scoping_errors_say_what_was_attempted(note_app: tuple[Flask, TenantJobs]) -> None:
    _, tenant_jobs = note_app
    with pytest.raises(NoTenantError, match=r"^Querying a tenant-scoped model needs"):
        db.session.scalars(sa.select(Note)).all()
    db.session.add(Note())
    with pytest.raises(NoTenantError, match=r"^Saving a tenant-scoped object needs"):
        db.session.flush()
    db.session.rollback()
    with tenant_jobs.switch("acme"):
        db.session.add(Note(tenant_id="globex"))
        with pytest.raises(TenantMismatchError, match=r"^The new Note belongs to tenant 'globex'"):
            db.session.flush()


CONFIGURATION_ERRORS: list[tuple[dict[str, t.Any], str]] = [
    ({"TENANT_JOBS_TENANTS": None}, "'TENANT_JOBS_TENANTS' is not set"),
    ({"TENANT_JOBS_STRATEGY": "rows"}, "'TENANT_JOBS_STRATEGY' is 'rows': use one of"),
    ({"TENANT_JOBS_RESOLVER": "cookie"}, "'TENANT_JOBS_RESOLVER' is 'cookie': use one of"),
    ({"SERVER_NAME": None}, "set 'SERVER_NAME' or 'TENANT_JOBS_BASE_DOMAIN'"),
    ({"TENANT_JOBS_CACHE_SECONDS": -1}, "'TENANT_JOBS_CACHE_SECONDS' is -1: use a number"),
    ({"TENANT_JOBS_SCHEMA_FORMAT": "t_"}, "use a string containing '{tenant}'"),
    ({"TENANT_JOBS_HEADER": ""}, "'TENANT_JOBS_HEADER' is '': use a non-empty string"),
]


@pytest.mark.parametrize(("config", "message"), CONFIGURATION_ERRORS)
def test_configuration_errors_name_the_setting(config: dict[str, t.Any], message: str) -> None:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite://", SERVER_NAME="example.test", TENANT_JOBS_TENANTS=["a"]
    )
    app.config.update(config)
    for key, value in config.items():
        if value is None:
            del app.config[key]
    SQLAlchemy(app)
    with pytest.raises(ConfigurationError) as raised:
        TenantJobs(app)
    assert message in str(raised.value)
    assert raised.value.tenant is None


def test_init_app_without_flask_sqlalchemy_says_what_to_call() -> None:
    app = Flask(__name__)
    app.config.update(SERVER_NAME="example.test", TENANT_JOBS_TENANTS=["acme"])
    with pytest.raises(ConfigurationError, match=r"call 'db.init_app\(app\)' first"):
        TenantJobs(app)


def test_an_app_without_the_extension_says_what_to_call() -> None:
    tenant_jobs = TenantJobs()
    app = Flask(__name__)
    with app.app_context(), pytest.raises(ConfigurationError, match="init_app"):
        tenant_jobs.tenant_names()


def _configured_app(name: str = "shop") -> Flask:
    """An app with Flask-SQLAlchemy and a valid base configuration, without the extension."""
    app = Flask(name)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite://", SERVER_NAME="example.test", TENANT_JOBS_TENANTS=["a"]
    )
    SQLAlchemy(app)
    return app


@pytest.mark.parametrize("second", ["same instance", "new instance"])
def test_a_second_init_app_on_one_app_is_refused_before_anything_is_installed_twice(
    second: str,
) -> None:
    app = _configured_app()
    tenant_jobs = TenantJobs(app)
    hooks = (len(app.before_request_funcs[None]), len(app.teardown_request_funcs[None]))
    celery_app = app.extensions.get("celery")
    again = tenant_jobs if second == "same instance" else TenantJobs()
    with pytest.raises(ConfigurationError, match=r"already been set up on app 'shop'"):
        again.init_app(app)
    assert app.extensions["tenant_jobs"] is tenant_jobs
    assert (len(app.before_request_funcs[None]), len(app.teardown_request_funcs[None])) == hooks
    assert app.extensions.get("celery") is celery_app
    with app.app_context():
        assert tenant_jobs.tenant_names() == ["a"]


def test_an_instance_used_with_an_app_another_instance_set_up_says_which_to_use() -> None:
    app = _configured_app()
    TenantJobs(app)
    with app.app_context(), pytest.raises(ConfigurationError, match="another TenantJobs"):
        TenantJobs().tenant_names()


@pytest.mark.parametrize("reach", [current_settings, extension_of, TenantJobs().tenant_names])
def test_every_path_to_a_missing_extension_says_the_same(reach: t.Callable[[], object]) -> None:
    app = _configured_app("plain")
    with app.app_context(), pytest.raises(ConfigurationError) as raised:
        reach()
    assert str(raised.value) == (
        "TenantJobs is not set up on app 'plain': call 'tenant_jobs.init_app(app, db=db)'."
    )
