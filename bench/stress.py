"""``python -m bench stress``: the isolation stress at full size (about 12 minutes).

The engine is ``tests/stress.py`` (``tests/test_stress.py`` runs it at CI size):
for the column and the schema strategy, the column strategy with row-level security
(``column+rls``, the worker connecting as a role that RLS applies to) and the same
with tasks that also run ``text()`` SQL naming no tenant and try to insert a row for
another tenant (``column+rls+sql``), the column strategy with fair dispatch on and
the tasks capped at 2 at once per tenant (``column+fair``: the most seen at once per
tenant is recorded, and must not exceed the cap), and for the prefork (-c 2), threads (-c 8)
and gevent (-c 50) pools, a ``flask tenant-jobs worker`` subprocess runs
``BENCH_STRESS_TASKS`` (default 10,000) interleaved tasks of
``BENCH_STRESS_TENANTS`` (default 50) tenants, each writing, reading, getting
and updating rows of its tenant; then every row is read back without scoping.
It prints the table (tasks sent, completed, lost, cross-tenant reads and
writes, the most tasks of one tenant at once under a cap, seconds) and fails if any
task was lost, any row crossed tenants or a cap was exceeded.

Not in ``MODULES``: it takes minutes, not seconds. ``BENCH_POSTGRES_URL`` names the
database (default ``root``; tables ``ftj_stress_*`` and schemas ``ftjstress_*`` are
dropped afterwards), ``BENCH_STRESS_REDIS_URL`` the Redis database (default
``redis://127.0.0.1:6379/8``; flushed). ``BENCH_STRESS_POOLS`` and
``BENCH_STRESS_STRATEGIES`` (comma-separated) pick a subset.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from tests.stress import POOLS, STRATEGIES, StressRun, format_table

from . import Row

POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/root"
)
REDIS_URL = os.environ.get("BENCH_STRESS_REDIS_URL", "redis://127.0.0.1:6379/8")
TENANTS = int(os.environ.get("BENCH_STRESS_TENANTS", "50"))
TASKS = int(os.environ.get("BENCH_STRESS_TASKS", "10000"))


def _listed(name: str, default: tuple[str, ...]) -> list[str]:
    value = os.environ.get(name)
    return value.split(",") if value else list(default)


def run() -> list[Row]:
    """Run the matrix and print its table; raise if anything was lost or crossed tenants."""
    log_dir = Path(tempfile.mkdtemp(prefix="ftj-stress-"))
    stress = StressRun(
        POSTGRES_URL,
        REDIS_URL,
        tenants=TENANTS,
        tasks=TASKS,
        log_dir=log_dir,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    outcomes = stress.run(
        _listed("BENCH_STRESS_POOLS", tuple(POOLS)),
        _listed("BENCH_STRESS_STRATEGIES", STRATEGIES),
    )
    print(format_table(outcomes))
    print(f"\nworker logs: {log_dir}")
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        print(f"\n{outcome.pool} x {outcome.strategy}:", *outcome.problems, sep="\n  ")
    if failed:
        raise AssertionError(f"{len(failed)} of {len(outcomes)} stress runs lost tasks or "
                             "crossed tenants (see above)")
    return []
