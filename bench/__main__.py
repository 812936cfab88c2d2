"""Every benchmark, each figure divided by a reference measured in the same run (``make bench``).

    python -m bench                       # a throwaway embedded PostgreSQL; Docker rows if Docker answers
    python -m bench --json results.json   # also write the rows as JSON
    python -m bench --only switch         # switch | drainer | delivery
    python -m bench --database-url URL    # an existing server (creates and drops databases of its own)

Benchmarks print figures; they assert nothing. Run them on a quiet machine, twice, and compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

from sqlalchemy import create_engine, pool, text

from bench.common import Row, print_row
from switcher import database_url
from switcher.testing import embedded_server


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=os.environ.get("SWITCHER_BENCH_DATABASE_URL"))
    parser.add_argument("--json", metavar="FILE", help="write the rows to FILE as JSON")
    parser.add_argument("--only", choices=("switch", "drainer", "delivery"), action="append")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="length of each throughput sample (three per figure)"
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    args = parser.parse_args()
    chosen = set(args.only or ("switch", "drainer", "delivery"))
    started = time.monotonic()
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        server = (
            database_url(args.database_url)
            if args.database_url
            else stack.enter_context(embedded_server()).url
        )
        with create_engine(server, poolclass=pool.NullPool).connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar()
        print(f"PostgreSQL {version}; {os.cpu_count()} CPUs; Python {platform.python_version()}\n")
        print(f"  {'what':<62} {'value':>10} {'reference':>10} {'unit':<9} {'ratio':>6} target")
        sections = []
        if "switch" in chosen:
            from bench import switch

            sections.append(lambda: switch.run(server, args.seconds, args.quick))
        if "drainer" in chosen:
            from bench import drainer

            sections.append(lambda: drainer.run(server, quick=args.quick))
        if "delivery" in chosen:
            from bench import delivery

            sections.append(lambda: delivery.run(server, quick=args.quick))
        for section in sections:
            for row in section():
                print_row(row)
                rows.append(row)
    print(f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"postgres": version, "cpus": os.cpu_count(), "rows": [r.as_dict() for r in rows]},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
