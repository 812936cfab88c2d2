"""The ``switcher`` command. Every option can also come from the environment variable shown in --help."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from .api import Switcher, database_url
from .errors import SwitcherError


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: Any,
    help: str,
    **kwargs: Any,
) -> None:
    """An option whose default comes from ``env`` when set; --help shows both."""
    type: Callable[[str], Any] = kwargs.pop("type", str)
    value = os.environ.get(env)
    parser.add_argument(
        flag,
        default=type(value) if value is not None else default,
        type=type,
        help=f"{help} (env {env}; default {default})",
        **kwargs,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switcher", description=__doc__)
    _option(parser, "--database-url", "SWITCHER_DATABASE_URL", None, "PostgreSQL URL")
    _option(parser, "--log-level", "SWITCHER_LOG_LEVEL", "INFO", "logging level")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="create or upgrade the switcher schema (Alembic upgrade head)")

    drain = commands.add_parser("drain", help="run the outbox drainer daemon until SIGTERM/SIGINT")
    _option(drain, "--concurrency", "SWITCHER_DRAIN_CONCURRENCY", 4, "handlers running at once", type=int)
    _option(
        drain, "--poll-interval", "SWITCHER_DRAIN_POLL_INTERVAL", 5.0, "seconds between polls", type=float
    )
    _option(drain, "--lease", "SWITCHER_DRAIN_LEASE", 30.0, "seconds a claim lasts unrenewed", type=float)
    _option(drain, "--max-attempts", "SWITCHER_DRAIN_MAX_ATTEMPTS", 10, "attempts before dead", type=int)
    _option(drain, "--backoff-base", "SWITCHER_DRAIN_BACKOFF_BASE", 1.0, "first retry delay, s", type=float)
    _option(drain, "--backoff-cap", "SWITCHER_DRAIN_BACKOFF_CAP", 300.0, "longest retry delay, s", type=float)
    _option(
        drain,
        "--shutdown-timeout",
        "SWITCHER_DRAIN_SHUTDOWN_TIMEOUT",
        30.0,
        "seconds to finish on stop",
        type=float,
    )
    _option(
        drain, "--worker-id", "SWITCHER_DRAIN_WORKER_ID", None, "name in leases (default host:pid:random)"
    )
    _option(
        drain,
        "--restart-mode",
        "SWITCHER_RESTART_MODE",
        "recreate",
        "recreate (applies the credential) or restart",
        choices=("recreate", "restart"),
    )
    _option(
        drain,
        "--credential-env",
        "SWITCHER_CREDENTIAL_ENV",
        "SWITCHER_CREDENTIAL",
        "environment variable that carries the credential inside the agent's container",
    )
    return parser


def _drain(args: argparse.Namespace) -> int:
    from .drainer import Drainer, DrainerConfig, default_worker_id
    from .handlers import default_handlers
    from .outbox import Backoff
    from .runtime.docker import DockerRuntime

    config = DrainerConfig(
        worker_id=args.worker_id or default_worker_id(),
        concurrency=args.concurrency,
        poll_interval=timedelta(seconds=args.poll_interval),
        lease=timedelta(seconds=args.lease),
        max_attempts=args.max_attempts,
        backoff=Backoff(timedelta(seconds=args.backoff_base), timedelta(seconds=args.backoff_cap)),
        shutdown_timeout=timedelta(seconds=args.shutdown_timeout),
    )
    engine = create_engine(
        database_url(args.database_url), pool_size=args.concurrency + 2, pool_pre_ping=True
    )
    runtime = DockerRuntime(mode=args.restart_mode, credential_env=args.credential_env)
    drainer = Drainer(engine, default_handlers(engine, runtime), config)
    drainer.install_signal_handlers()
    clean = drainer.run()
    engine.dispose()
    if not clean:
        # Handler threads are still running; do not wait for them at interpreter exit.
        logging.shutdown()
        os._exit(3)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.database_url:
        print("switcher: no database: pass --database-url or set SWITCHER_DATABASE_URL", file=sys.stderr)
        return 2
    try:
        if args.command == "drain":
            return _drain(args)
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
