"""The ``switcher`` command. Every option can also come from an environment variable."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sqlalchemy.exc import OperationalError

from .api import Switcher
from .errors import SwitcherError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switcher", description=__doc__)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("SWITCHER_DATABASE_URL"),
        help="PostgreSQL URL (env SWITCHER_DATABASE_URL)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="create or upgrade the switcher schema (Alembic upgrade head)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.database_url:
        print("switcher: no database: pass --database-url or set SWITCHER_DATABASE_URL", file=sys.stderr)
        return 2
    try:
        with Switcher.from_url(args.database_url) as sw:
            if args.command == "migrate":
                sw.migrate()
                print("switcher: schema is at the newest migration")
    except SwitcherError as error:
        print(f"switcher: {error}", file=sys.stderr)
        return 2
    except OperationalError as error:
        print(f"switcher: cannot reach the database: {error.orig}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
