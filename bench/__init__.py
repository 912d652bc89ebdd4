"""Benchmarks of flask-tenant-jobs against the same work done by hand.

Each benchmark module exposes ``run() -> list[Row]``; ``python -m bench`` runs
them all and prints one table. Baseline and measured code run interleaved in
the same process, so the ratio is what matters, not the absolute numbers.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import time
import typing as t
from dataclasses import dataclass
from urllib.parse import urlsplit

import sqlalchemy as sa

Context = t.Callable[[], t.ContextManager[object]]
#: Settings of every bench app with flask-tenant-jobs: the optional integrations that
#: run per task or request (Prometheus metrics, the OpenTelemetry span attribute) off,
#: as for a user without those libraries; ``bench/observability.py`` measures them.
CORE_SETTINGS: dict[str, t.Any] = {"TENANT_JOBS_METRICS": False, "TENANT_JOBS_OTEL_ATTRIBUTE": None}


@dataclass(frozen=True)
class Row:
    """One line of the table: the same operation without and with the library."""

    name: str
    baseline_us: float
    measured_us: float
    ratio: float
    target: float | None = None  # the highest acceptable ratio, if there is one

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


def time_per_op(fn: t.Callable[[], object], number: int) -> float:
    """Seconds per call of ``fn`` over ``number`` calls (garbage collection off)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number
    finally:
        if enabled:
            gc.enable()


def compare(
    name: str,
    baseline: t.Callable[[], object],
    measured: t.Callable[[], object],
    *,
    number: int,
    repeat: int | None = None,
    seconds: float = 2.0,
    min_repeat: int = 10,
    target: float | None = None,
    baseline_context: Context = contextlib.nullcontext,
    measured_context: Context = contextlib.nullcontext,
) -> Row:
    """Time ``baseline`` and ``measured`` in alternating batches of ``number`` calls.

    Batches alternate (in alternating order) for about ``seconds``, at least
    ``min_repeat`` times each (exactly ``repeat`` times if it is given, e.g. for
    batches that take seconds), and the best batch of each side counts: noise from
    other processes only ever adds time, so the minimum of many short batches is
    the most repeatable estimate. Each batch runs inside a fresh ``*_context()``
    (e.g. an app context), entered outside the timing. Both sides are warmed up
    first (caches, compiled statements, connections).
    """
    sides: list[tuple[t.Callable[[], object], Context, list[float]]] = [
        (baseline, baseline_context, []),
        (measured, measured_context, []),
    ]
    for fn, context, _ in sides:
        with context():
            time_per_op(fn, number)
    deadline = time.perf_counter() + seconds

    def more(done: int) -> bool:
        if repeat is not None:
            return done < repeat
        return done < min_repeat or time.perf_counter() < deadline

    i = 0
    while more(i):
        for fn, context, times in sides if i % 2 == 0 else reversed(sides):
            with context():
                times.append(time_per_op(fn, number))
        i += 1
    best_base, best_measured = min(sides[0][2]), min(sides[1][2])
    return Row(name, best_base * 1e6, best_measured * 1e6, best_measured / best_base, target)


def format_table(rows: t.Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| benchmark | baseline µs/op | measured µs/op | ratio | target | met |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        target = f"<= {row.target:.2f}x" if row.target is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[row.met]
        lines.append(
            f"| {row.name} | {row.baseline_us:.1f} | {row.measured_us:.1f} "
            f"| {row.ratio:.3f}x | {target} | {met} |"
        )
    return "\n".join(lines)


def without_autovacuum(engine: t.Any, table: str) -> None:
    """Keep PostgreSQL's autovacuum off ``table`` (a bench table filled just before): its
    ANALYZE halfway through a row would change the query plan of one side's batches."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(sa.text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))


def redis_reachable(url: str) -> bool:
    """Whether a TCP connection to the Redis server of ``url`` opens (within 2 s)."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2).close()
    except OSError:
        return False
    return True
