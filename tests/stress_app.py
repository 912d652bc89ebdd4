"""The app of the isolation stress and crash tests (``tests/stress.py``, ``tests/test_crash.py``).

Importable by worker subprocesses (``flask --app tests.stress_app:create_app()
tenant-jobs worker``), so it is configured from environment variables (the
test side passes the same values to :func:`create_app` as keyword arguments):

* ``TEST_STRESS_DATABASE_URL`` (PostgreSQL), ``TEST_STRESS_REDIS_URL`` (broker and results);
* ``TEST_STRESS_STRATEGY``: ``column`` (default) or ``schema``;
* ``TEST_STRESS_RLS=1``: ``TENANT_JOBS_RLS`` on (column strategy; connect as a role that
  row-level security applies to);
* ``TEST_STRESS_FAIR=1``: ``TENANT_JOBS_FAIR_DISPATCH`` on (the tasks sent are then
  :func:`capped_read_write`, at most :data:`CAP` at once per tenant);
* ``TEST_STRESS_TENANTS``: how many tenants (``t000``, ``t001``, ...; default 20);
* ``TEST_STRESS_SCHEMA_FORMAT``: ``TENANT_JOBS_SCHEMA_FORMAT`` (default ``ftjstress_{tenant}``);
* ``TEST_STRESS_QUEUE``: Celery's ``task_default_queue``;
* ``TEST_STRESS_DURABLE=1``: the settings docs/reliability.md recommends (``task_acks_late``,
  ``task_reject_on_worker_lost``, ``worker_prefetch_multiplier=1``, a Redis
  ``visibility_timeout`` of ``TEST_STRESS_VISIBILITY_TIMEOUT`` seconds (default 5) and
  abandoned messages looked for every second).

Each row records the tenant the sender meant (``owner``, an argument the task
stores but never uses to scope anything) and the tenant the task believed it
was in (``believed``), so that a row in the wrong place, or a row read from the
wrong tenant, can be counted.
"""

from __future__ import annotations

import os
import time
import typing as t

import redis
import sqlalchemy as sa
from celery import Task
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.dialects.postgresql import insert as pg_insert

from flask_tenant_jobs import TenantJobs, TenantScoped, current_tenant, tenant_task

db = SQLAlchemy()
tenant_jobs = TenantJobs()

DEFAULT_TENANTS = 20
DEFAULT_SCHEMA_FORMAT = "ftjstress_{tenant}"
#: How many of its tenant's newest rows each stress task reads.
READ_LIMIT = 20
#: ``tenant_concurrency`` of :func:`capped_read_write`.
CAP = 2
#: Redis hashes: tenant -> capped tasks running now / the most seen running at once.
RUNNING_KEY = "ftj-stress:running"
PEAK_KEY = "ftj-stress:peak"
# One more running task of a tenant, and the highest count kept: atomic in Redis.
_ENTER = """
local now = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if now > tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') then
  redis.call('HSET', KEYS[2], ARGV[1], now)
end
return now
"""
_REDIS: dict[tuple[int, str], redis.Redis] = {}


def tenant_name(number: int) -> str:
    return f"t{number:03d}"


def tenant_names(count: int) -> list[str]:
    return [tenant_name(i) for i in range(count)]


class StressRow(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """Column strategy: a row scoped by ``tenant_id`` (filled in by the library)."""

    __tablename__ = "ftj_stress_row"

    id = db.Column(db.Integer, primary_key=True)
    label = db.Column(db.String(80), nullable=False)
    owner = db.Column(db.String(63), nullable=False)
    believed = db.Column(db.String(63))
    #: The owners of the tasks that updated the row, space-separated, in order.
    touched_by = db.Column(db.Text, nullable=False, default="")


class StressSchemaRow(db.Model):  # type: ignore[name-defined,misc]
    """Schema strategy: a plain row; only the tenant's schema keeps tenants apart.

    It has no ``tenant_id`` filter that could hide a wrong ``search_path``.
    """

    __tablename__ = "ftj_stress_schema_row"

    id = db.Column(db.Integer, primary_key=True)
    label = db.Column(db.String(80), nullable=False)
    owner = db.Column(db.String(63), nullable=False)
    believed = db.Column(db.String(63))
    touched_by = db.Column(db.Text, nullable=False, default="")


class OnceRow(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """The effect of an idempotent task: one row per key and tenant, whatever the retries."""

    __tablename__ = "ftj_stress_once"
    __table_args__ = (sa.UniqueConstraint("tenant_id", "key"),)

    id = db.Column(db.Integer, primary_key=True)
    key = db.Column(db.String(80), nullable=False)
    owner = db.Column(db.String(63), nullable=False)
    believed = db.Column(db.String(63))


class Attempt(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
    """One row per execution of an idempotent task (redeliveries show up here)."""

    __tablename__ = "ftj_stress_attempt"

    id = db.Column(db.Integer, primary_key=True)
    key = db.Column(db.String(80), nullable=False)
    pid = db.Column(db.Integer, nullable=False)


def row_model() -> t.Any:
    """The row model of the current app's strategy."""
    strategy = tenant_jobs.settings.strategy
    return StressSchemaRow if strategy == "schema" else StressRow


@tenant_task(bind=True)
def read_write(
    self: Task, label: str, owner: str, probe: int, forge_for: str | None = None
) -> dict[str, t.Any]:
    """Write a row, read the tenant's newest rows, get and update the row with id ``probe``."""
    return _read_write(self, label, owner, probe, forge_for)


@tenant_task(bind=True, tenant_concurrency=CAP)
def capped_read_write(
    self: Task, label: str, owner: str, probe: int, forge_for: str | None = None
) -> dict[str, t.Any]:
    """:func:`read_write` with at most :data:`CAP` running at once per tenant, counting
    (in Redis, :data:`PEAK_KEY`) how many of its tenant's run with it."""
    client = _redis(self.app.conf.broker_url)
    tenant = t.cast(str, current_tenant())
    client.eval(_ENTER, 2, RUNNING_KEY, PEAK_KEY, tenant)
    try:
        return _read_write(self, label, owner, probe, forge_for)
    finally:
        client.hincrby(RUNNING_KEY, tenant, -1)


def peaks(client: redis.Redis) -> dict[str, int]:
    """Per tenant, the most :func:`capped_read_write` tasks seen running at once."""
    raw = t.cast(dict[bytes, bytes], client.hgetall(PEAK_KEY))
    return {key.decode(): int(value) for key, value in raw.items()}


def _redis(url: str) -> redis.Redis:
    """This process's Redis client (made again in a forked pool process)."""
    key = (os.getpid(), url)
    client = _REDIS.get(key)
    if client is None:
        client = _REDIS[key] = redis.Redis.from_url(url)
    return client


def _read_write(
    self: Task, label: str, owner: str, probe: int, forge_for: str | None
) -> dict[str, t.Any]:
    """The body of :func:`read_write`.

    Returns what the task saw: its tenant and header, and for every row it read
    (the newest rows, and ``session.get(probe)`` if that found one) the owner and,
    with the column strategy, the ``tenant_id``. With ``forge_for`` (another tenant's
    name; column strategy with row-level security), the same again through
    ``text()`` SQL that names no tenant, and an attempt to insert a row for that
    tenant (``forged``: whether the database let it through).
    """
    model = row_model()
    tenant = current_tenant()
    db.session.add(model(label=label, owner=owner, believed=tenant))
    db.session.flush()
    rows = db.session.scalars(sa.select(model).order_by(model.id.desc()).limit(READ_LIMIT))
    seen = [_row_tenants(row) for row in rows]
    probed = db.session.get(model, probe)
    if probed is not None:
        seen.append(_row_tenants(probed))
    # An ORM UPDATE by primary key: must only ever reach this tenant's row.
    db.session.execute(
        sa.update(model)
        .where(model.id == probe)
        .values(touched_by=model.touched_by + owner + " ")
        .execution_options(synchronize_session=False)
    )
    forged = _unfiltered_sql(label, owner, probe, forge_for, seen) if forge_for else False
    db.session.commit()
    return {
        "tenant": tenant,
        "header": getattr(self.request, "tenant_for_job", None),
        "label": label,
        "seen": seen,
        "forged": forged,
        "pid": os.getpid(),
    }


def _unfiltered_sql(
    label: str, owner: str, probe: int, other: str, seen: list[list[str | None]]
) -> bool:
    """``text()`` SQL with no tenant filter at all: only row-level security scopes it.

    Reads the newest rows into ``seen``, updates the row with id ``probe``, and tries
    to insert a row for tenant ``other`` (in a savepoint); returns whether it went in.
    """
    connection = db.session.connection()
    newest = sa.text(
        "SELECT owner, tenant_id FROM ftj_stress_row ORDER BY id DESC LIMIT :limit"
    )
    seen.extend([row.owner, row.tenant_id] for row in connection.execute(
        newest, {"limit": READ_LIMIT}
    ))
    connection.execute(
        sa.text("UPDATE ftj_stress_row SET touched_by = touched_by || :owner || ' ' "
                "WHERE id = :probe"),
        {"owner": owner, "probe": probe},
    )
    forge = sa.text(
        "INSERT INTO ftj_stress_row (label, owner, believed, touched_by, tenant_id) "
        "VALUES (:label, :owner, :other, '', :other)"
    )
    try:
        with db.session.begin_nested():
            db.session.connection().execute(
                forge, {"label": f"{label}-forged", "owner": other, "other": other}
            )
    except sa.exc.ProgrammingError:  # new row violates row-level security policy
        return False
    return True


def _row_tenants(row: t.Any) -> list[str | None]:
    """What a read row says about its tenant: its owner and its ``tenant_id`` (if any)."""
    return [row.owner, getattr(row, "tenant_id", row.owner)]


@tenant_task(bind=True)
def once(self: Task, key: str, owner: str, seconds: float = 0.0) -> dict[str, t.Any]:
    """An idempotent task: log the attempt, work ``seconds``, insert the key's row once.

    The row is inserted with ``INSERT ... ON CONFLICT DO NOTHING`` on the unique
    ``(tenant_id, key)``: run twice (a redelivery), it leaves one row.
    """
    tenant = current_tenant()
    db.session.add(Attempt(key=key, pid=os.getpid()))
    db.session.commit()
    time.sleep(seconds)
    result = db.session.execute(
        pg_insert(OnceRow)
        .values(key=key, owner=owner, believed=tenant)
        .on_conflict_do_nothing(index_elements=["tenant_id", "key"])
    )
    inserted = t.cast("sa.CursorResult[t.Any]", result).rowcount
    db.session.commit()
    return {
        "tenant": tenant,
        "header": getattr(self.request, "tenant_for_job", None),
        "key": key,
        "inserted": inserted,
        "pid": os.getpid(),
    }


def celery_config(
    redis_url: str, queue: str, durable: bool, visibility_timeout: float
) -> dict[str, t.Any]:
    """The ``CELERY`` settings; ``durable``: the ones docs/reliability.md recommends."""
    config: dict[str, t.Any] = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "task_default_queue": queue,
        "broker_connection_retry_on_startup": True,
        "result_expires": 3600,
    }
    if durable:
        config.update(
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            broker_transport_options={
                "visibility_timeout": visibility_timeout,
                # look for abandoned messages every second (kombu's default: ~100 s)
                "unacked_restore_interval": 1,
                "unacked_restore_throttle": 1,
            },
            result_backend_always_retry=True,
        )
    return config


def create_app(
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    strategy: str | None = None,
    tenants: int | None = None,
    schema_format: str | None = None,
    queue: str | None = None,
    durable: bool | None = None,
    visibility_timeout: float | None = None,
    rls: bool | None = None,
    fair: bool | None = None,
) -> Flask:
    """The stress app; each argument defaults to its ``TEST_STRESS_*`` environment variable."""
    env = os.environ.get
    database_url = database_url or env("TEST_STRESS_DATABASE_URL")
    redis_url = redis_url or env("TEST_STRESS_REDIS_URL", "redis://127.0.0.1:6379/7")
    if not database_url:
        raise RuntimeError("set TEST_STRESS_DATABASE_URL (a PostgreSQL URL)")
    if durable is None:
        durable = env("TEST_STRESS_DURABLE") == "1"
    if visibility_timeout is None:
        visibility_timeout = float(env("TEST_STRESS_VISIBILITY_TIMEOUT", "5"))
    if rls is None:
        rls = env("TEST_STRESS_RLS") == "1"
    if fair is None:
        fair = env("TEST_STRESS_FAIR") == "1"
    app = Flask(__name__)
    app.config.update(
        SERVER_NAME="example.test",
        SQLALCHEMY_DATABASE_URI=database_url,
        TENANT_JOBS_STRATEGY=strategy or env("TEST_STRESS_STRATEGY", "column"),
        TENANT_JOBS_TENANTS=tenant_names(
            tenants or int(env("TEST_STRESS_TENANTS", DEFAULT_TENANTS))
        ),
        TENANT_JOBS_SCHEMA_FORMAT=schema_format
        or env("TEST_STRESS_SCHEMA_FORMAT", DEFAULT_SCHEMA_FORMAT),
        CELERY=celery_config(
            redis_url, queue or env("TEST_STRESS_QUEUE", "ftj-stress"), durable, visibility_timeout
        ),
        TENANT_JOBS_RLS=rls,
    )
    if fair:
        app.config["TENANT_JOBS_FAIR_DISPATCH"] = True
    db.init_app(app)
    tenant_jobs.init_app(app, db=db)
    return app


def env_for(
    *,
    database_url: str,
    redis_url: str,
    strategy: str,
    tenants: int,
    schema_format: str,
    queue: str,
    durable: bool = False,
    visibility_timeout: float = 5.0,
    rls: bool = False,
    fair: bool = False,
) -> dict[str, str]:
    """The ``TEST_STRESS_*`` variables that make a subprocess's :func:`create_app` match."""
    return {
        "TEST_STRESS_DATABASE_URL": database_url,
        "TEST_STRESS_REDIS_URL": redis_url,
        "TEST_STRESS_STRATEGY": strategy,
        "TEST_STRESS_TENANTS": str(tenants),
        "TEST_STRESS_SCHEMA_FORMAT": schema_format,
        "TEST_STRESS_QUEUE": queue,
        "TEST_STRESS_DURABLE": "1" if durable else "0",
        "TEST_STRESS_VISIBILITY_TIMEOUT": str(visibility_timeout),
        "TEST_STRESS_RLS": "1" if rls else "0",
        "TEST_STRESS_FAIR": "1" if fair else "0",
    }
