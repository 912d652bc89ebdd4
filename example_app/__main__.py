"""``python -m example_app demo``: show tenant isolation through real requests."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_app",
        description="The flask-tenant-jobs example shop. To serve it: flask --app example_app run",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="create orders as two tenants through real requests, show what each sees, then "
        "run the jobs on an in-process worker (resets the example's tables; DATABASE_URL "
        "picks the database, default SQLite; TENANT_JOBS_STRATEGY=schema gives each tenant "
        "its own PostgreSQL schema; CELERY_BROKER_URL the broker, default embedded)",
    )
    demo.add_argument(
        "--instance",
        metavar="FOLDER",
        help="the folder of the SQLite database and the embedded broker (default: instance/)",
    )
    options = parser.parse_args(argv)

    from . import create_app
    from .demo import run_demo, run_jobs_demo

    app = create_app(instance_path=options.instance)
    isolated = run_demo(app).isolated
    return 0 if isolated and run_jobs_demo(app).correct else 1


if __name__ == "__main__":
    sys.exit(main())
