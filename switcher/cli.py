"""switcher: move agents off failing subscriptions, and restart their containers after commit.

Every option can also come from the environment variable shown in its help. Human-readable tables by
default; --json for scripts. Errors print one line and exit non-zero (2: bad input, 1: database).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError

from . import logs, outbox
from .api import Switcher, database_url
from .errors import SwitcherError

log = logging.getLogger(__name__)


def _option(
    parser: argparse.ArgumentParser, flag: str, env: str, default: Any, help: str, **kwargs: Any
) -> None:
    """An option whose default comes from ``env`` when set; --help shows both."""
    convert: Callable[[str], Any] = kwargs.pop("type", str)
    value = os.environ.get(env)
    parser.add_argument(
        flag,
        default=convert(value) if value is not None else default,
        type=convert,
        help=f"{help} (env {env}; default {default})",
        **kwargs,
    )


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switcher", description=__doc__)
    _option(parser, "--database-url", "SWITCHER_DATABASE_URL", None, "PostgreSQL URL")
    _option(parser, "--log-level", "SWITCHER_LOG_LEVEL", "INFO", "logging level")
    _option(parser, "--log-format", "SWITCHER_LOG_FORMAT", "text", "log lines", choices=("text", "json"))
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("migrate", help="create or upgrade the switcher schema (Alembic upgrade head)")
    _registry_parsers(commands)
    _outbox_parsers(commands)
    _drain_parser(commands)
    demo = commands.add_parser("demo", help="play the whole job with real processes, then check it")
    _option(
        demo,
        "--runtime",
        "SWITCHER_DEMO_RUNTIME",
        "auto",
        "docker, simulated or auto",
        choices=("auto", "docker", "simulated"),
    )
    demo.add_argument("--sabotage", choices=("duplicate-switch",), help=argparse.SUPPRESS)
    _environment_for_every_option(parser, [])
    return parser


def _environment_for_every_option(parser: argparse.ArgumentParser, path: list[str]) -> None:
    """Give each option not already tied to a variable one named after it: ``--priority`` of
    ``subscription add`` reads SWITCHER_SUBSCRIPTION_ADD_PRIORITY. --help shows the name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                _environment_for_every_option(subparser, [*path, name])
            continue
        if not action.option_strings:
            continue
        if (
            action.dest == "help"
            or action.help == argparse.SUPPRESS
            or "(env SWITCHER_" in (action.help or "")
        ):
            continue
        env = "SWITCHER_" + "_".join([*path, action.dest]).upper()
        raw = os.environ.get(env)
        if raw is not None:
            convert = action.type if callable(action.type) else (_on_off if action.nargs == 0 else str)
            action.default = convert(raw)
            action.required = False
        action.help = f"{action.help or ''} (env {env})".strip()


def _registry_parsers(commands: Any) -> None:
    sub = commands.add_parser("subscription", help="register and inspect subscriptions").add_subparsers(
        dest="action", required=True
    )
    add = sub.add_parser("add", help="register a subscription")
    add.add_argument("name")
    add.add_argument("--credential-ref", required=True, help="env:VARIABLE or file:/path, never the secret")
    add.add_argument("--priority", type=int, default=0, help="lower is preferred on equal load (default 0)")
    add.add_argument("--max-agents", type=int, default=None, help="capacity (default unlimited)")
    add.add_argument("--disabled", action="store_true", help="register it disabled")
    sub.add_parser("list", help="subscriptions with assigned agents and cooldown")
    for action in ("enable", "disable"):
        sub.add_parser(action, help=f"{action} a subscription as an alternative").add_argument("name")

    agent = commands.add_parser("agent", help="register and inspect agents").add_subparsers(
        dest="action", required=True
    )
    add = agent.add_parser("add", help="register an agent")
    add.add_argument("name")
    add.add_argument("--subscription", default=None)
    add.add_argument("--container", default=None, help="Docker container name")
    agent.add_parser("list", help="agents with their subscription and generation")
    assign = agent.add_parser("assign", help="move an agent by hand (enqueues a restart)")
    assign.add_argument("name")
    assign.add_argument("subscription")

    fail = commands.add_parser("fail", help="report a failure by hand, as a backend would")
    fail.add_argument("agent")
    fail.add_argument("--snapshot", required=True, help="the subscription the failed request used")
    fail.add_argument("--kind", required=True, choices=("rate_limit", "auth"))
    fail.add_argument("--message", default="", help="the error text")

    commands.add_parser("status", help="agents, subscriptions, outbox backlog, dead messages")

    settings = commands.add_parser("settings", help="cluster-wide settings").add_subparsers(
        dest="action", required=True
    )
    settings.add_parser("get")
    setter = settings.add_parser("set")
    setter.add_argument("--auto-switch", type=_on_off, default=None, help="on or off")
    setter.add_argument("--cooldown", type=float, default=None, help="cooldown window in seconds")


def _outbox_parsers(commands: Any) -> None:
    box = commands.add_parser("outbox", help="inspect and repair restart messages").add_subparsers(
        dest="action", required=True
    )
    listing = box.add_parser("list", help="newest messages first")
    listing.add_argument("--status", choices=outbox.OUTBOX_STATUSES, default=None)
    listing.add_argument("--limit", type=int, default=50)
    box.add_parser("show", help="one message").add_argument("id", type=int)
    box.add_parser("retry", help="requeue a dead (or finished) message").add_argument("id", type=int)
    purge = box.add_parser("purge", help="delete finished (done, superseded) messages")
    purge.add_argument("--older-than", type=float, default=7.0, help="days since last change (default 7)")
    purge.add_argument("--dead", action="store_true", help="dead messages too")


def _drain_parser(commands: Any) -> None:
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
        drain, "--shutdown-timeout", "SWITCHER_DRAIN_SHUTDOWN_TIMEOUT", 30.0, "seconds to finish", type=float
    )
    _option(
        drain, "--worker-id", "SWITCHER_DRAIN_WORKER_ID", None, "name in leases (default host:pid:random)"
    )
    _option(
        drain,
        "--no-listen",
        "SWITCHER_DRAIN_NO_LISTEN",
        False,
        "poll only (behind a transaction pooler)",
        type=_on_off,
        nargs="?",
        const=True,
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
        "variable that carries the credential inside the agent's container",
    )
    _option(drain, "--metrics-port", "SWITCHER_METRICS_PORT", None, "serve /metrics and /healthz", type=int)


# -- output -----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(_plain(value))


def table(rows: Sequence[Any], columns: Sequence[str]) -> str:
    cells = [[_cell(getattr(r, c) if not isinstance(r, dict) else r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def show(self, value: Any, columns: Sequence[str] | None = None, title: str | None = None) -> None:
        if self.as_json:
            print(json.dumps(_plain(value), indent=2, default=str))
        elif columns is not None:
            print(table(value if isinstance(value, list) else [value], columns))
        else:
            width = max(len(k) for k in _plain(value))
            for key, item in _plain(value).items():
                print(f"{key.ljust(width)}  {_cell(item)}")


# -- commands ---------------------------------------------------------------------------------------

SUBSCRIPTION_COLUMNS = (
    "name",
    "credential_ref",
    "priority",
    "max_agents",
    "enabled",
    "assigned",
    "cooling_until",
)
AGENT_COLUMNS = ("name", "subscription", "generation", "container")
RESULT_COLUMNS = ("outcome", "agent", "old_subscription", "new_subscription", "generation", "restart_id")
OUTBOX_COLUMNS = ("id", "kind", "agent", "generation", "status", "attempts", "result", "last_error")


def _run(args: argparse.Namespace, out: Output) -> int:
    if args.command == "drain":
        return _drain(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.database_url, runtime=args.runtime, sabotage=args.sabotage)
    with Switcher.from_url(args.database_url) as sw:
        return _registry_command(sw, args, out)


def _registry_command(sw: Switcher, args: argparse.Namespace, out: Output) -> int:  # noqa: PLR0912
    command, action = args.command, getattr(args, "action", None)
    if command == "migrate":
        sw.migrate()
        out.show({"migrated": True, "schema": "switcher"})
    elif command == "subscription":
        if action == "add":
            out.show(
                sw.add_subscription(
                    args.name,
                    credential_ref=args.credential_ref,
                    priority=args.priority,
                    max_agents=args.max_agents,
                    enabled=not args.disabled,
                ),
                SUBSCRIPTION_COLUMNS,
            )
        elif action == "list":
            out.show(sw.subscriptions(), SUBSCRIPTION_COLUMNS)
        else:
            (sw.enable_subscription if action == "enable" else sw.disable_subscription)(args.name)
            out.show(sw.subscription(args.name), SUBSCRIPTION_COLUMNS)
    elif command == "agent":
        if action == "add":
            out.show(
                sw.add_agent(args.name, subscription=args.subscription, container=args.container),
                AGENT_COLUMNS,
            )
        elif action == "list":
            out.show(sw.agents(), AGENT_COLUMNS)
        else:
            out.show(sw.assign(args.name, args.subscription), RESULT_COLUMNS)
    elif command == "fail":
        out.show(sw.handle_failure(args.agent, args.snapshot, args.kind, args.message), RESULT_COLUMNS)
    elif command == "status":
        _status(sw, out)
    elif command == "outbox":
        _outbox(sw, args, out)
    elif command == "settings":
        if action == "set":
            sw.update_settings(
                auto_switch=args.auto_switch,
                cooldown_window=None if args.cooldown is None else timedelta(seconds=args.cooldown),
            )
        out.show(sw.settings())
    return 0


def _status(sw: Switcher, out: Output) -> None:
    with sw.engine.connect() as conn:
        backlog = outbox.stats(conn)
        dead = outbox.list_messages(conn, status="dead", limit=20)
    agents, subscriptions, settings = sw.agents(), sw.subscriptions(), sw.settings()
    if out.as_json:
        everything = {"agents": agents, "subscriptions": subscriptions, "outbox": backlog, "dead": dead}
        out.show({**everything, "settings": settings})
        return
    print(table(agents, AGENT_COLUMNS), end="\n\n")
    print(table(subscriptions, SUBSCRIPTION_COLUMNS), end="\n\n")
    oldest = "-" if backlog.oldest_pending_seconds is None else f"{backlog.oldest_pending_seconds:.1f} s"
    print(
        f"outbox: {backlog.pending} pending, {backlog.running} running, {backlog.dead} dead; oldest {oldest}"
    )
    window = settings.cooldown_window.total_seconds()
    print(f"auto-switch {'on' if settings.auto_switch else 'off'}; cooldown window {window:.0f} s")
    if dead:
        print("\ndead messages (switcher outbox retry ID):")
        print(table(dead, OUTBOX_COLUMNS))


def _outbox(sw: Switcher, args: argparse.Namespace, out: Output) -> None:
    with sw.engine.connect() as conn:
        if args.action == "list":
            out.show(outbox.list_messages(conn, status=args.status, limit=args.limit), OUTBOX_COLUMNS)
        elif args.action == "show":
            out.show(outbox.get_message(conn, args.id))
        elif args.action == "retry":
            out.show({"id": args.id, "status": outbox.requeue(conn, args.id)})
        else:
            statuses = (*outbox.FINISHED_STATUSES, "dead") if args.dead else outbox.FINISHED_STATUSES
            deleted = outbox.purge(conn, older_than=timedelta(days=args.older_than), statuses=statuses)
            out.show({"deleted": deleted})


def _drain(args: argparse.Namespace) -> int:
    from .drainer import Drainer, DrainerConfig, default_worker_id
    from .handlers import default_handlers
    from .runtime.docker import DockerRuntime

    config = DrainerConfig(
        worker_id=args.worker_id or default_worker_id(),
        concurrency=args.concurrency,
        poll_interval=timedelta(seconds=args.poll_interval),
        lease=timedelta(seconds=args.lease),
        max_attempts=args.max_attempts,
        backoff=outbox.Backoff(timedelta(seconds=args.backoff_base), timedelta(seconds=args.backoff_cap)),
        shutdown_timeout=timedelta(seconds=args.shutdown_timeout),
        listen=not args.no_listen,
    )
    engine = create_engine(
        database_url(args.database_url), pool_size=args.concurrency + 2, pool_pre_ping=True
    )
    runtime = DockerRuntime(mode=args.restart_mode, credential_env=args.credential_env)
    drainer = Drainer(engine, default_handlers(engine, runtime), config)
    drainer.install_signal_handlers()
    server = None
    if args.metrics_port is not None:
        from .metrics import serve

        server = serve(drainer, args.metrics_port)
        log.info("serving /metrics and /healthz", extra={"port": server.server_port})
    clean = drainer.run()
    if server is not None:
        server.shutdown()
    engine.dispose()
    if not clean:
        # Handler threads are still running; do not wait for them at interpreter exit.
        logging.shutdown()
        os._exit(3)
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    if args.command != "demo" and not args.database_url:
        print("switcher: no database: pass --database-url or set SWITCHER_DATABASE_URL", file=sys.stderr)
        return 2
    try:
        return _run(args, Output(args.json))
    except SwitcherError as error:
        print(f"switcher: {_one_line(error)}", file=sys.stderr)
        return 2
    except DBAPIError as error:
        print(f"switcher: database error: {_one_line(error.orig or error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
