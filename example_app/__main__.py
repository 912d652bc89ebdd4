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
    commands.add_parser(
        "demo",
        help="create orders as two tenants through real requests and show what each sees "
        "(resets the example's tables; DATABASE_URL picks the database, default SQLite)",
    )
    parser.parse_args(argv)

    from .demo import run_demo

    return 0 if run_demo().isolated else 1


if __name__ == "__main__":
    sys.exit(main())
