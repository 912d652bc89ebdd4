"""Instruction counts under callgrind: the library's cost per operation, free of timing noise.

``python -m bench instructions`` runs each side of each comparison in its own
Python process under ``valgrind --tool=callgrind`` and counts the instructions
one operation executes (the interpreter's and every C library's, not the
database server's). Counts repeat from run to run within a fraction of a
percent, whatever else the machine is doing, so differences of 1-2 % that
wall-clock ratios cannot resolve show up here.

Each side runs in a process of its own, and the baseline's process never
imports flask-tenant-jobs, so none of the library's hooks (global Celery
signal receivers included) can run in it. Inside a process, every operation is
warmed up first; only the ``number`` calls between two callgrind client
requests are counted (a tiny C helper built with the system compiler issues
them), and the count is divided by ``number``.

Needs ``valgrind``, its headers (``valgrind/callgrind.h``) and a C compiler.
About 2-4 minutes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing as t
from dataclasses import dataclass
from pathlib import Path

from . import CORE_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
#: Calls counted per operation (after the warm-up calls).
NUMBER = int(os.environ.get("BENCH_INSTRUCTIONS_NUMBER", "200"))
WARMUP = 50
TENANT = "t03"
TENANTS = [f"t{i:02d}" for i in range(10)]
ROWS_PER_TENANT = 100

#: Contexts the child keeps entered (a tenant switch, its temporary folder) until it ends.
_KEEP_OPEN = contextlib.ExitStack()

_MARKS_C = """
#include <valgrind/callgrind.h>
void marks_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void marks_collect(void) { CALLGRIND_ZERO_STATS; CALLGRIND_TOGGLE_COLLECT; }
void marks_dump(const char *name) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS_AT(name); }
"""


@dataclass(frozen=True)
class Comparison:
    """One table row: the same operation on the baseline side and on a measured side."""

    name: str
    operation: str
    measured_side: str = "tenant"


#: What the table compares: each operation runs on the ``plain`` side (no library)
#: and on its measured side.
COMPARISONS = [
    Comparison("worker-side per task (tracer, no broker)", "task"),
    Comparison("worker-side per task, signing on (tracer, no broker)", "task", "signed"),
    Comparison("request with subdomain resolution vs plain Flask", "request"),
    Comparison("SQLite: select 10 rows, statement built per call", "select_built"),
    Comparison("SQLite: same statement object reused", "select_reused"),
    Comparison("SQLite: session.get(), not in session", "get_fresh"),
]


# -- the child process: one side, every operation ------------------------------------


class _Marks:
    """The callgrind client requests, through a helper compiled once per run."""

    def __init__(self, library: str) -> None:
        self._lib = ctypes.CDLL(library)

    def start(self) -> None:
        """Start instrumenting (the setup before it ran at full speed, uncounted)."""
        self._lib.marks_start()

    def count(self, name: str, fn: t.Callable[[], object], number: int) -> None:
        """Warm ``fn`` up, then count ``number`` calls and dump them as ``name``.

        Garbage collection is off while counting (as in ``bench.time_per_op``): a
        collection's cost depends on everything else on the heap, not on ``fn``,
        and moved the counts by up to 8 % between runs of unchanged code.
        """
        for _ in range(WARMUP):
            fn()
        gc.collect()
        gc.disable()
        try:
            self._lib.marks_collect()
            for _ in range(number):
                fn()
            self._lib.marks_dump(name.encode())
        finally:
            gc.enable()


def _plain_operations() -> dict[str, t.Callable[[], object]]:
    """The baseline: Celery, Flask and Flask-SQLAlchemy without the library."""
    import sqlalchemy as sa
    from celery import Celery
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    celery_app = Celery("plain", set_as_current=False)

    @celery_app.task(name="bench.plain_noop")
    def plain_noop() -> None:
        return None

    db = SQLAlchemy()

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "bench_items"
        id = sa.Column(sa.Integer, primary_key=True)
        bucket = sa.Column(sa.Integer, index=True)
        name = sa.Column(sa.String(50))
        tenant_id = sa.Column(sa.String(63), index=True)  # last, as in the mixin

    app = _flask_app(Flask, db)
    app.app_context().push()
    _fill(db, Item)
    pk = db.session.scalars(sa.select(Item.id).where(Item.tenant_id == TENANT).limit(1)).one()
    reused = sa.select(Item).where(Item.bucket == 7, Item.tenant_id == TENANT)

    def get_fresh() -> None:
        item = db.session.get(Item, pk)
        assert item is not None and item.tenant_id == TENANT
        db.session.expunge_all()

    return {
        "task": _tracer(plain_noop, {}),
        "request": _request(app),
        "select_built": _select(db, lambda: sa.select(Item).where(
            Item.bucket == 7, Item.tenant_id == TENANT)),
        "select_reused": _select(db, lambda: reused),
        "get_fresh": get_fresh,
    }


def _tenant_operations() -> dict[str, t.Callable[[], object]]:
    """The same operations with the library: a tenant task, resolution, scoped queries."""
    import sqlalchemy as sa
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from flask_tenant_jobs import TenantJobs, TenantScoped, tenant_task

    @tenant_task(name="bench.tenant_noop")
    def tenant_noop() -> None:
        return None

    db = SQLAlchemy()
    tenant_jobs = TenantJobs()

    class Item(TenantScoped, db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "bench_items"
        id = sa.Column(sa.Integer, primary_key=True)
        bucket = sa.Column(sa.Integer, index=True)
        name = sa.Column(sa.String(50))

    app = _flask_app(Flask, db, **CORE_SETTINGS, TENANT_JOBS_TENANTS=TENANTS,
                     CELERY={"broker_url": "memory://", "task_ignore_result": True})
    tenant_jobs.init_app(app, db=db)
    app.app_context().push()
    _fill(db, Item)
    celery_app = tenant_jobs.celery
    task = celery_app.tasks["bench.tenant_noop"]
    tracer = _tracer(task, {"tenant_for_job": TENANT})
    request = _request(app)  # requests start with no tenant: resolution sets it
    _KEEP_OPEN.enter_context(tenant_jobs.switch(TENANT))  # the queries run in the tenant
    pk = db.session.scalars(sa.select(Item.id).limit(1)).one()
    reused = sa.select(Item).where(Item.bucket == 7)

    def get_fresh() -> None:
        assert db.session.get(Item, pk) is not None
        db.session.expunge_all()

    return {
        "task": tracer,
        "request": request,
        "select_built": _select(db, lambda: sa.select(Item).where(Item.bucket == 7)),
        "select_reused": _select(db, lambda: reused),
        "get_fresh": get_fresh,
    }


def _signed_operations() -> dict[str, t.Callable[[], object]]:
    """A tenant task whose message carries a signed tenant (``TENANT_JOBS_SIGNING_KEY``)."""
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from flask_tenant_jobs import TenantJobs, tenant_task

    @tenant_task(name="bench.tenant_noop")
    def tenant_noop() -> None:
        return None

    db = SQLAlchemy()
    tenant_jobs = TenantJobs()
    app = _flask_app(Flask, db, **CORE_SETTINGS, TENANT_JOBS_TENANTS=TENANTS,
                     TENANT_JOBS_SIGNING_KEY="bench-signing-key-0123456789abcdef",
                     CELERY={"broker_url": "memory://", "task_ignore_result": True})
    tenant_jobs.init_app(app, db=db)
    app.app_context().push()
    celery_app = tenant_jobs.celery
    task = celery_app.tasks["bench.tenant_noop"]
    signature = celery_app.tenant_signer.sign(task.name, "id", TENANT)
    return {"task": _tracer(task, {"tenant_for_job": TENANT,
                                   "tenant_for_job_signature": signature})}


SIDES: dict[str, t.Callable[[], dict[str, t.Callable[[], object]]]] = {
    "plain": _plain_operations,
    "tenant": _tenant_operations,
    "signed": _signed_operations,
}


def _flask_app(flask_class: type[t.Any], db: t.Any, **config: t.Any) -> t.Any:
    """The app both sides share: SQLite in a temporary file, one view that returns a string."""
    app = flask_class(__name__)
    folder = _KEEP_OPEN.enter_context(tempfile.TemporaryDirectory(prefix="bench-instructions-"))
    app.config.update(SERVER_NAME="example.test",
                      SQLALCHEMY_DATABASE_URI=f"sqlite:///{folder}/bench.sqlite3", **config)
    db.init_app(app)
    app.add_url_rule("/ping", "ping", lambda: "pong")
    return app


def _fill(db: t.Any, model: type[t.Any]) -> None:
    import sqlalchemy as sa

    db.create_all()
    rows = [
        {"tenant_id": tenant, "bucket": i % 10, "name": f"{tenant}-{i}"}
        for tenant in TENANTS
        for i in range(ROWS_PER_TENANT)
    ]
    with db.engine.begin() as connection:
        connection.execute(sa.insert(model.__table__), rows)


def _tracer(task: t.Any, request: dict[str, t.Any]) -> t.Callable[[], object]:
    """What a worker runs per message of ``task``, without the broker."""
    from celery.app.trace import build_tracer

    trace = build_tracer(task.name, task, app=task.app, eager=False, propagate=True)
    base = {"id": "id", "delivery_info": {}, "ignore_result": True, **request}
    return lambda: trace("id", (), {}, dict(base))


def _request(app: t.Any) -> t.Callable[[], object]:
    client = app.test_client()

    def request() -> None:
        response = client.get("/ping", headers={"Host": f"{TENANT}.example.test"})
        assert response.status_code == 200, response.status_code

    return request


def _select(db: t.Any, statement: t.Callable[[], t.Any]) -> t.Callable[[], object]:
    def select() -> None:
        assert len(db.session.scalars(statement()).all()) == ROWS_PER_TENANT // 10
        db.session.expunge_all()

    return select


def child(side: str, library: str) -> None:
    """Run inside callgrind: count every operation of ``side``."""
    operations = SIDES[side]()
    marks = _Marks(library)
    marks.start()
    with _KEEP_OPEN:
        for name, fn in operations.items():
            marks.count(name, fn, NUMBER)


# -- the parent: build the helper, run the sides, print the table --------------------


def _build_marks(folder: Path) -> Path:
    source, library = folder / "marks.c", folder / "marks.so"
    source.write_text(_MARKS_C)
    compiler = os.environ.get("CC", "cc")
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", str(library), str(source)],
                   check=True)
    return library


def _counts(side: str, library: Path, folder: Path) -> dict[str, int]:
    """Instructions per operation on ``side``, from the dumps of one callgrind run."""
    out = folder / f"{side}.out"
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
         f"--callgrind-out-file={out}", sys.executable, "-m", "bench.instructions",
         "--child", side, str(library)],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"},
    )
    counts: dict[str, int] = {}
    for dump in folder.glob(f"{side}.out.*"):
        text = dump.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.MULTILINE)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
        if trigger and total:
            counts[trigger.group(1)] = int(total.group(1)) // NUMBER
    return counts


def _table(plain: dict[str, int], measured: dict[str, dict[str, int]]) -> str:
    lines = [
        "| operation | baseline instructions/op | measured instructions/op | ratio | delta/op |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in COMPARISONS:
        base, mine = plain[row.operation], measured[row.measured_side][row.operation]
        lines.append(f"| {row.name} | {base:,} | {mine:,} | {mine / base:.3f}x "
                     f"| {mine - base:+,} |")
    return "\n".join(lines)


def run() -> list[t.Any]:
    """Run every side under callgrind and print the table (its own: counts, not µs)."""
    for tool in ("valgrind", os.environ.get("CC", "cc")):
        if shutil.which(tool) is None:
            raise RuntimeError(f"bench instructions needs {tool!r} on PATH")
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        folder = Path(tmp)
        library = _build_marks(folder)
        sides = {row.measured_side for row in COMPARISONS} | {"plain"}
        counts = {}
        for side in sorted(sides):
            print(f"counting side {side!r} under callgrind ...", file=sys.stderr, flush=True)
            counts[side] = _counts(side, library, folder)
    print(_table(counts.pop("plain"), counts))
    print(f"\n{NUMBER} calls counted per operation after {WARMUP} warm-up calls")
    return []


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    child(sys.argv[2], sys.argv[3])
