"""``python -m bench [module ...]``: run the benchmark modules and print one table.

``python -m bench`` runs every module of ``MODULES``; ``python -m bench core`` only
``bench.core``. A module exposes ``run() -> list[Row]``; ``bench.stress`` (minutes, so
not in ``MODULES``) prints a table of its own and returns no rows.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

from . import Row, format_table

#: Benchmark modules, each exposing ``run() -> list[Row]``. Add new ones here.
MODULES = [
    "bench.core",
    "bench.jobs",
    "bench.schema",
    "bench.caching",
    "bench.observability",
    "bench.rls",
]


def main(argv: list[str]) -> int:
    names = [f"bench.{name}" for name in argv] or MODULES
    rows: list[Row] = []
    failed: list[str] = []
    started = time.perf_counter()
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            rows.extend(importlib.import_module(name).run())
        except Exception:
            traceback.print_exc()
            failed.append(name)
    if rows:
        print(format_table(rows))
    print(f"\n{len(rows)} benchmarks in {time.perf_counter() - started:.0f} s", end="")
    missed = [row.name for row in rows if row.met is False]
    if rows:
        print(f"; targets missed: {', '.join(missed)}" if missed else "; all targets met")
    else:
        print()
    if failed:
        print(f"failed modules: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
