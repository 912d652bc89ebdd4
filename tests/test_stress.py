"""Isolation under load, CI size: the engine of ``tests/stress.py`` on every pool and strategy.

20 tenants and 170 interleaved tasks per pool (prefork -c 2, threads -c 8,
gevent -c 50) and strategy combination (column, schema, column with row-level
security, the same with tasks that also run ``text()`` SQL naming no tenant
and try to insert rows for another, and column with fair dispatch and a
per-tenant cap): about 2,500 tasks in all, on worker subprocesses started with
``flask tenant-jobs worker``. Zero tasks lost, zero rows read from or written to
another tenant, the cap never exceeded. The table of the run is
printed at the end of the module (``python -m bench stress`` runs the full size).

Redis database ``TEST_STRESS_REDIS_DB`` (default 7) is flushed and used; the
PostgreSQL database is ``TEST_POSTGRES_URL``'s (tables ``ftj_stress_*`` and
schemas ``ftjstress_*``, dropped afterwards).
"""

from __future__ import annotations

import os
import typing as t
from collections.abc import Iterator

import pytest

from tests.stress import (
    POOLS,
    STRATEGIES,
    Outcome,
    Sent,
    StressRun,
    check_results,
    check_rows,
    format_table,
)
from tests.worker_processes import redis_db_url

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

REDIS_DB = int(os.environ.get("TEST_STRESS_REDIS_DB", "7"))
TENANTS = 20
TASKS = 170

_OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="module")
def stress_run(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StressRun]:
    run = StressRun(
        postgres_url,
        redis_db_url(redis_url, REDIS_DB),
        tenants=TENANTS,
        tasks=TASKS,
        log_dir=tmp_path_factory.mktemp("stress"),
    )
    try:
        yield run
    finally:
        run.close()


@pytest.fixture(scope="module", params=STRATEGIES)
def strategy_app(
    request: pytest.FixtureRequest, stress_run: StressRun
) -> Iterator[tuple[str, t.Any]]:
    """Each strategy combination and its test-side app, its tables or tenant schemas made
    (and dropped)."""
    with stress_run.storage(request.param) as app:
        yield request.param, app


@pytest.fixture(scope="module", autouse=True)
def _print_table(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if _OUTCOMES and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n\n" + format_table(_OUTCOMES))


@pytest.mark.slow
@pytest.mark.parametrize("pool", list(POOLS))
def test_interleaved_tasks_of_many_tenants_stay_isolated(
    stress_run: StressRun, strategy_app: tuple[str, t.Any], pool: str
) -> None:
    strategy, app = strategy_app
    outcome = stress_run.run_one(app, pool, strategy)
    _OUTCOMES.append(outcome)
    assert outcome.sent == TASKS
    assert outcome.ok, format_table([outcome]) + "\n" + "\n".join(outcome.problems)
    assert outcome.rows_read > TASKS  # the tasks did read rows (of their own tenant)


def test_the_checks_count_what_goes_wrong() -> None:
    """The counting itself: a foreign read, a forged insert, misplaced and doubled rows,
    lost tasks."""
    sent = [Sent(f"id{i}", f"{i}-t00{i % 2}", f"t00{i % 2}") for i in range(6)]

    def ok(label: str, tenant: str, seen: list[list[str]]) -> dict[str, t.Any]:
        result = {"tenant": tenant, "header": tenant, "label": label, "seen": seen}
        return {"status": "SUCCESS", "result": result}

    forged = ok("0-t000", "t000", [["t000", "t000"], ["t001", "t001"]])  # read a foreign row
    forged["result"]["forged"] = True  # and inserted a row for another tenant
    results = {
        "id0": forged,
        "id1": ok("1-t001", "t000", []),  # ran in the wrong tenant
        "id2": {"status": "FAILURE", "result": {"exc_type": "RuntimeError"}},
        # id3: no result at all
        "id4": ok("4-t000", "t000", [["t000", "t000"]]),
        "id5": ok("5-t001", "t001", [["t001", "t001"]]),  # reported success, row missing
    }
    outcome = Outcome("threads", 8, "column", 2, sent=len(sent))
    completed = check_results(sent, results, outcome)
    assert (outcome.completed, outcome.failed, outcome.lost) == (3, 1, 1)
    assert (outcome.wrong_tenant, outcome.cross_reads, outcome.rows_read) == (1, 1, 4)
    assert outcome.cross_writes == 1

    rows = [
        ("0-t000", "t000", "t000", "t000", ""),
        ("1-t001", "t000", "t001", "t000", ""),  # written into another tenant
        ("2-t000", "t000", "t000", "t000", "t001 "),  # updated by a task of t001
        ("4-t000", "t000", "t000", "t000", "t000 t000 "),
        ("4-t000", "t000", "t000", "t000", ""),  # twice
    ]
    check_rows(sent, completed, rows, outcome)
    assert outcome.cross_writes == 3
    assert (outcome.completed, outcome.lost) == (2, 2)
    assert any("2 rows for '4-t000'" in problem for problem in outcome.problems)
    assert not outcome.ok


def test_a_cap_exceeded_fails_the_run() -> None:
    outcome = Outcome("threads", 8, "column+fair", 2, sent=0, cap=2, peak=2)
    assert outcome.ok
    outcome.peak = 3
    assert not outcome.ok
