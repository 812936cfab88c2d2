"""switcher: move agents off failing subscriptions, and deliver the new credential to their containers.

Every option can also come from the environment variable its help shows. Tables for people, --json for
scripts. A mistake prints one line and exits 2; exit 1 means the database could not be reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import importlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from importlib.metadata import version
from typing import Any, TypeVar

import click
from sqlalchemy.exc import DBAPIError

from . import logs
from .api import Switcher
from .errors import SwitcherError
from .operations import Status

log = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_USAGE = 2
EXIT_DATABASE = 1
EXIT_CHECK_FAILED = 3


# -- option types ------------------------------------------------------------------------------------


class Seconds(click.ParamType[float]):
    """A finite number of seconds within bounds (``nan``, ``inf`` and ``1e20`` are refused)."""

    name = "seconds"

    def __init__(self, minimum: float = 0.0, maximum: float = 366 * 86400, *, above: bool = False) -> None:
        self.minimum, self.maximum, self.above = minimum, maximum, above

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        low_ok = seconds > self.minimum if self.above else seconds >= self.minimum
        if not (math.isfinite(seconds) and low_ok and seconds <= self.maximum):
            bound = "above" if self.above else "at least"
            self.fail(
                f"{value!r} must be {bound} {_number(self.minimum)} and at most {_number(self.maximum)}",
                param,
                ctx,
            )
        return seconds


def _number(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:g}"


class Days(Seconds):
    name = "days"

    def __init__(self) -> None:
        super().__init__(0.0, 3660.0)


class OnOff(click.ParamType[bool]):
    name = "on|off"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        word = str(value).lower()
        if word in ("on", "true", "1", "yes"):
            return True
        if word in ("off", "false", "0", "no"):
            return False
        self.fail(f"expected on or off, got {value!r}", param, ctx)


class CommaList(click.ParamType[str]):
    """A repeatable option whose environment variable holds a comma-separated list."""

    name = "text"
    envvar_list_splitter = ","

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if not text:
            self.fail("must not be empty", param, ctx)
        return text


# -- output ------------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """JSON-ready: dataclasses, enums, times and durations (seconds) as plain values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
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
    return str(plain(value))


def table(rows: Sequence[Any], columns: Sequence[str]) -> str:
    def get(row: Any, column: str) -> Any:
        return row.get(column) if isinstance(row, dict) else getattr(row, column)

    cells = [[_cell(get(r, c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


@dataclasses.dataclass
class App:
    """What every command gets: how to reach the database, and how to answer."""

    database_url: str | None
    as_json: bool

    @contextlib.contextmanager
    def switcher(self) -> Iterator[Switcher]:
        if not self.database_url:
            raise click.UsageError("no database: pass --database-url or set SWITCHER_DATABASE_URL")
        with Switcher.from_url(self.database_url, pool_pre_ping=True) as sw:
            yield sw

    def show(self, value: Any, columns: Sequence[str] | None = None) -> None:
        if self.as_json:
            click.echo(json.dumps(plain(value), indent=2, default=str))
        elif columns is not None:
            click.echo(table(value if isinstance(value, list) else [value], columns))
        elif isinstance(value, dict) or dataclasses.is_dataclass(value):
            fields = plain(value)
            width = max((len(k) for k in fields), default=0)
            for key, item in fields.items():
                click.echo(f"{key.ljust(width)}  {_cell(item)}")
        else:
            click.echo(str(value))


pass_app = click.make_pass_decorator(App)
option = functools.partial(click.option, show_envvar=True)
"""Every option can come from the environment (SWITCHER_<COMMAND>_<OPTION>); its help says which."""

SUBSCRIPTION_COLUMNS = (
    "name",
    "credential_ref",
    "priority",
    "max_agents",
    "enabled",
    "assigned",
    "cooling_until",
)
AGENT_COLUMNS = ("name", "subscription", "generation", "container", "placement")
RESULT_COLUMNS = ("outcome", "agent", "old_subscription", "new_subscription", "generation", "restart_id")
OUTBOX_COLUMNS = ("id", "kind", "agent", "generation", "status", "attempts", "result", "last_error")
SWITCH_COLUMNS = ("switched_at", "agent", "old_subscription", "new_subscription", "kind", "generation")
DRAINER_COLUMNS = ("worker_id", "placement", "seen_seconds_ago")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


# -- the commands ------------------------------------------------------------------------------------


@click.group(context_settings={"auto_envvar_prefix": "SWITCHER", "show_default": True})
@option("--database-url", metavar="URL", help="PostgreSQL URL (postgresql://user:pw@host/db)")
@option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO")
@option("--log-format", type=click.Choice(("text", "json")), default="text", help="json: one object a line")
@option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="SWITCHER_JSON",
    help="print JSON instead of tables (errors too)",
)
@click.version_option(version("switcher"), prog_name="switcher", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, log_level: str, log_format: str, as_json: bool) -> None:
    """Move agents off failing subscriptions, once, across processes; deliver the new credential to their
    containers after commit.

    Every option can also be set by the environment variable its help names. Mistakes print one line and
    exit 2; exit 1 means the database could not be reached.
    """
    logs.configure(log_level, "json" if log_format == "json" else "text")
    ctx.obj = App(database_url, as_json)


@cli.command()
@pass_app
def migrate(app: App) -> None:
    """Create or upgrade schema switcher (run as its owner)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with app.switcher() as sw:
        before = sw.schema_revision()
        after = sw.migrate()
    if app.as_json:
        app.show({"schema": "switcher", "revision": after, "previous": before})
    elif before == after:
        click.echo(f"schema switcher is up to date (revision {after})")
    else:
        click.echo(f"schema switcher migrated from {before or 'nothing'} to revision {after}")


@cli.command()
@pass_app
def check(app: App) -> None:
    """Schema at head, functions as shipped, drainers alive, backlog, dead messages, counters (exit 3 on a
    failed check)."""
    with app.switcher() as sw:
        results = sw.check()
    if app.as_json:
        app.show(results)
    else:
        for result in results:
            click.echo(f"[{'ok' if result.ok else 'FAIL'}] {result.name}: {result.detail}")
    if not all(r.ok for r in results):
        raise SystemExit(EXIT_CHECK_FAILED)


@cli.command()
@option("--watch", is_flag=True, help="redraw until Ctrl-C")
@option("--interval", type=Seconds(0.1, 3600), default=2.0, help="seconds between redraws with --watch")
@pass_app
def status(app: App, watch: bool, interval: float) -> None:
    """Agents, subscriptions, outbox backlog, dead messages, recent switches, drainers."""
    with app.switcher() as sw:
        if not watch:
            _print_status(app, sw.status())
            return
        with _first_ctrl_c() as pressed:
            while not pressed():
                current = sw.status()
                click.echo("\x1b[H\x1b[2J", nl=False)  # home, clear screen
                _print_status(app, current, live=True)
                sys.stdout.flush()  # a frame at a time, even into a pipe
                redraw = time.monotonic() + interval
                while not pressed() and (left := redraw - time.monotonic()) > 0:
                    time.sleep(min(left, 0.05))


@contextlib.contextmanager
def _first_ctrl_c() -> Iterator[Callable[[], bool]]:
    """Whether Ctrl-C (SIGINT) was pressed. The first press is only noted: as a KeyboardInterrupt it could
    land in a finalizer (a connection's ``__del__``), where Python ignores it, and the press would be
    lost. A second press raises it, for a call that hangs. (A flag, not an Event: a signal handler must
    not take a lock its thread may hold.)"""
    pressed = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_status(app: App, current: Status, live: bool = False) -> None:
    if app.as_json:
        app.show(current)
        return
    if live:
        click.echo(f"switcher status -- {datetime.now():%H:%M:%S} (Ctrl-C to quit)\n")
    settings = current.settings
    click.echo(
        f"auto-switch {'on' if settings.auto_switch else 'off'}; cooldown "
        f"{settings.cooldown_window.total_seconds():.0f} s; retention {settings.retention.days} days; "
        f"webhook {settings.webhook or 'none'}\n"
    )
    click.echo(table(current.subscriptions, ("name", "enabled", "assigned", "max_agents", "cooling_until")))
    box = current.outbox
    oldest = "-" if box.oldest_pending_seconds is None else f"{box.oldest_pending_seconds:.1f} s"
    click.echo(
        f"\noutbox: {box.pending} pending, {box.running} running, {box.dead} dead; oldest pending {oldest}"
    )
    if current.recent_switches:
        click.echo("\nrecent switches:")
        click.echo(table(current.recent_switches, SWITCH_COLUMNS))
    if current.drainers:
        click.echo("\ndrainers:")
        click.echo(table([d for d in current.drainers if d["stopped_at"] is None], DRAINER_COLUMNS))
    if not live:
        click.echo("\nagents:")
        click.echo(table(current.agents, AGENT_COLUMNS))
    if current.dead:
        click.echo("\ndead messages (switcher outbox retry ID):")
        click.echo(table(current.dead, OUTBOX_COLUMNS))


@cli.command()
@click.argument("agent")
@option("--snapshot", required=True, help="the subscription the failed request used")
@option("--kind", required=True, type=click.Choice(("rate_limit", "auth")))
@option("--message", default="", help="the error text (stored redacted)")
@option("--report-id", default=None, help="the report's id: the same id again returns the same answer")
@pass_app
def fail(app: App, agent: str, snapshot: str, kind: str, message: str, report_id: str | None) -> None:
    """Report a failure by hand, as a backend would."""
    with app.switcher() as sw:
        app.show(sw.handle_failure(agent, snapshot, kind, message, report_id=report_id), RESULT_COLUMNS)


@cli.command()
@option("--batch", type=click.IntRange(1, 100_000), default=1_000, help="rows per statement")
@pass_app
def prune(app: App, batch: int) -> None:
    """Delete history past the retention period now (drainers do it in the background)."""
    with app.switcher() as sw:
        app.show(sw.prune(batch))


@cli.command()
@option("--yes", is_flag=True, help="really drop schema switcher and everything in it")
@pass_app
def uninstall(app: App, yes: bool) -> None:
    """Drop schema switcher with every subscription, agent, message and record in it."""
    if not yes:
        raise click.UsageError("uninstall drops schema switcher and all it holds; pass --yes to do it")
    with app.switcher() as sw:
        sw.uninstall()
    app.show({"uninstalled": "switcher"})


# -- subscriptions and agents ------------------------------------------------------------------------


@cli.group()
def subscription() -> None:
    """Register and inspect subscriptions."""


@subscription.command("add")
@click.argument("name")
@option("--credential-ref", required=True, help="env:VARIABLE or file:/path, never the secret")
@option("--priority", type=click.IntRange(-(2**31), 2**31 - 1), default=0, help="lower is preferred")
@option("--max-agents", type=click.IntRange(1, 2**31 - 1), default=None, help="capacity (default: none)")
@option("--disabled", is_flag=True, help="register it disabled")
@pass_app
def subscription_add(
    app: App, name: str, credential_ref: str, priority: int, max_agents: int | None, disabled: bool
) -> None:
    """Register a subscription."""
    with app.switcher() as sw:
        added = sw.add_subscription(
            name,
            credential_ref=credential_ref,
            priority=priority,
            max_agents=max_agents,
            enabled=not disabled,
        )
    app.show(added, SUBSCRIPTION_COLUMNS)


@subscription.command("list")
@pass_app
def subscription_list(app: App) -> None:
    """Subscriptions with their load and cooldown."""
    with app.switcher() as sw:
        app.show(sw.subscriptions(), SUBSCRIPTION_COLUMNS)


@subscription.command("enable")
@click.argument("name")
@pass_app
def subscription_enable(app: App, name: str) -> None:
    """Let switches choose it again."""
    with app.switcher() as sw:
        app.show(sw.enable_subscription(name), SUBSCRIPTION_COLUMNS)


@subscription.command("disable")
@click.argument("name")
@pass_app
def subscription_disable(app: App, name: str) -> None:
    """Stop switches from choosing it."""
    with app.switcher() as sw:
        app.show(sw.disable_subscription(name), SUBSCRIPTION_COLUMNS)


@subscription.command("set-credential")
@click.argument("name")
@click.argument("credential_ref")
@pass_app
def subscription_set_credential(app: App, name: str, credential_ref: str) -> None:
    """Point it at another credential reference (applied at each agent's next restart)."""
    with app.switcher() as sw:
        app.show(sw.set_credential(name, credential_ref), SUBSCRIPTION_COLUMNS)


@subscription.command("remove")
@click.argument("name")
@pass_app
def subscription_remove(app: App, name: str) -> None:
    """Remove it (refused while agents use it)."""
    with app.switcher() as sw:
        sw.remove_subscription(name)
    app.show({"removed": name})


@cli.group()
def agent() -> None:
    """Register and inspect agents."""


@agent.command("add")
@click.argument("name")
@option("--subscription", default=None)
@option("--container", default=None, help="Docker container name")
@option("--placement", default=None, help="the Docker host whose drainers restart it")
@pass_app
def agent_add(
    app: App, name: str, subscription: str | None, container: str | None, placement: str | None
) -> None:
    """Register an agent."""
    with app.switcher() as sw:
        added = sw.add_agent(name, subscription=subscription, container=container, placement=placement)
    app.show(added, AGENT_COLUMNS)


@agent.command("list")
@pass_app
def agent_list(app: App) -> None:
    """Agents with their subscription and generation."""
    with app.switcher() as sw:
        app.show(sw.agents(), AGENT_COLUMNS)


@agent.command("assign")
@click.argument("name")
@click.argument("subscription")
@pass_app
def agent_assign(app: App, name: str, subscription: str) -> None:
    """Move an agent by hand (enqueues its restart)."""
    with app.switcher() as sw:
        app.show(sw.assign(name, subscription), RESULT_COLUMNS)


@agent.command("remove")
@click.argument("name")
@pass_app
def agent_remove(app: App, name: str) -> None:
    """Remove an agent and its records (its container is left alone)."""
    with app.switcher() as sw:
        sw.remove_agent(name)
    app.show({"removed": name})


# -- settings and the outbox -------------------------------------------------------------------------


@cli.group()
def settings() -> None:
    """Cluster-wide settings."""


@settings.command("get")
@pass_app
def settings_get(app: App) -> None:
    """Show them."""
    with app.switcher() as sw:
        app.show(sw.settings())


@settings.command("set")
@option("--auto-switch", type=OnOff(), default=None)
@option("--cooldown", type=Seconds(), default=None, help="cooldown window, seconds")
@option(
    "--webhook", default=None, help="env:NAME (or file:/path) of the URL told of every switch; '' removes"
)
@option("--retention", type=Seconds(3600, 3660 * 86400), default=None, help="history kept, seconds")
@pass_app
def settings_set(
    app: App, auto_switch: bool | None, cooldown: float | None, webhook: str | None, retention: float | None
) -> None:
    """Change what is given, leave the rest."""
    with app.switcher() as sw:
        app.show(
            sw.update_settings(
                auto_switch=auto_switch,
                cooldown_window=cooldown,
                webhook=webhook,
                retention=retention,
            )
        )


@cli.group()
def outbox() -> None:
    """Inspect and repair outbox messages (restarts, notifications)."""


@outbox.command("list")
@option(
    "--status",
    type=click.Choice(("pending", "running", "done", "dead", "superseded", "cancelled")),
    default=None,
)
@option("--limit", type=click.IntRange(1, 10_000), default=50)
@pass_app
def outbox_list(app: App, status: str | None, limit: int) -> None:
    """Newest messages first."""
    with app.switcher() as sw:
        app.show(sw.messages(status=status, limit=limit), OUTBOX_COLUMNS)


@outbox.command("show")
@click.argument("message_id", type=click.IntRange(1))
@pass_app
def outbox_show(app: App, message_id: int) -> None:
    """One message."""
    with app.switcher() as sw:
        app.show(sw.message(message_id))


@outbox.command("retry")
@click.argument("message_ids", nargs=-1, type=click.IntRange(1))
@option("--all-dead", is_flag=True, help="every dead message")
@pass_app
def outbox_retry(app: App, message_ids: tuple[int, ...], all_dead: bool) -> None:
    """Give dead (or finished) messages a full set of attempts again."""
    if not message_ids and not all_dead:
        raise click.UsageError("name the messages to retry, or pass --all-dead")
    with app.switcher() as sw:
        statuses = sw.retry(list(message_ids), all_dead=all_dead)
    app.show([{"id": i, "status": s} for i, s in sorted(statuses.items())], ("id", "status"))


@outbox.command("cancel")
@click.argument("message_ids", nargs=-1, required=True, type=click.IntRange(1))
@pass_app
def outbox_cancel(app: App, message_ids: tuple[int, ...]) -> None:
    """Withdraw pending messages."""
    with app.switcher() as sw:
        cancelled = sw.cancel(list(message_ids))
    app.show([{"id": i, "status": "cancelled"} for i in cancelled], ("id", "status"))


@outbox.command("purge")
@option("--older-than", type=Days(), default=7.0, help="days since the last change")
@option("--dead", is_flag=True, help="dead messages too")
@pass_app
def outbox_purge(app: App, older_than: float, dead: bool) -> None:
    """Delete finished messages (done, superseded, cancelled)."""
    with app.switcher() as sw:
        app.show({"deleted": sw.purge(timedelta(days=older_than), dead=dead)})


# -- daemons and the demo ----------------------------------------------------------------------------


@cli.command()
@option("--placement", default=None, help="only agents placed here (default: agents placed nowhere)")
@option(
    "--restart-mode",
    type=click.Choice(("auto", "reload", "recreate", "restart")),
    default="auto",
    help="auto: hot reload where the container has a hook, else drain-aware recreate",
)
@option("--drain-timeout", type=Seconds(0, 86400), default=300.0, help="wait this long for executions")
@option("--stop-timeout", type=Seconds(0, 3600), default=10.0, help="docker stop's grace period")
@option("--reload-timeout", type=Seconds(0, 3600, above=True), default=30.0, help="a reload hook's limit")
@option("--webhook-timeout", type=Seconds(0, 3600, above=True), default=10.0, help="the webhook's limit")
@option(
    "--credential-env-prefix",
    "env_prefixes",
    type=CommaList(),
    multiple=True,
    default=("SWITCHER_CRED_",),
    envvar="SWITCHER_CREDENTIAL_ENV_PREFIX",
    help="env: references may name only variables starting so",
)
@option(
    "--credential-dir",
    "directories",
    type=CommaList(),
    multiple=True,
    default=("/run/secrets",),
    envvar="SWITCHER_CREDENTIAL_DIR",
    help="file: references may name only files under these",
)
@option(
    "--credential-env", default="SWITCHER_CREDENTIAL", help="variable carrying it in a recreated container"
)
@option("--concurrency", type=click.IntRange(1, 1024), default=4, help="handlers running at once")
@option("--prefetch", type=click.IntRange(0, 4096), default=0, help="messages claimed ahead of free handlers")
@option("--poll-interval", type=Seconds(0, 86400, above=True), default=5.0, help="polling fallback")
@option("--lease", type=Seconds(1, 86400), default=30.0, help="seconds a claim lasts unrenewed")
@option("--max-attempts", type=click.IntRange(1, 1_000_000), default=10)
@option("--backoff-base", type=Seconds(0, 3600), default=1.0, help="first retry delay")
@option("--backoff-cap", type=Seconds(0, 86400), default=300.0, help="longest retry delay")
@option("--shutdown-timeout", type=Seconds(0, 86400), default=30.0, help="seconds to finish on SIGTERM")
@option("--worker-id", default=None, help="name in leases (default host:pid:random)")
@option("--no-listen", is_flag=True, help="poll only (behind a transaction-pooling proxy)")
@option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="serve /metrics and /healthz")
@option("--metrics-host", default="127.0.0.1", help="address to serve them on")
@pass_app
def drain(app: App, /, **options: Any) -> None:
    """Run the outbox drainer until SIGTERM/SIGINT: restarts agents and sends switch notifications."""
    from .drainer import Backoff, Drainer, DrainerConfig, check_lease, default_worker_id

    if not app.database_url:
        raise click.UsageError("no database: pass --database-url or set SWITCHER_DATABASE_URL")
    o = options
    if o["backoff_base"] > o["backoff_cap"]:
        raise click.BadParameter("must not exceed --backoff-cap", param_hint="--backoff-base")
    config = DrainerConfig(
        worker_id=o["worker_id"] or default_worker_id(),
        placement=o["placement"],
        concurrency=o["concurrency"],
        prefetch=o["prefetch"],
        poll_interval=timedelta(seconds=o["poll_interval"]),
        lease=timedelta(seconds=o["lease"]),
        max_attempts=o["max_attempts"],
        backoff=Backoff(timedelta(seconds=o["backoff_base"]), timedelta(seconds=o["backoff_cap"])),
        shutdown_timeout=timedelta(seconds=o["shutdown_timeout"]),
        listen=not o["no_listen"],
    )
    check_lease(config, timedelta(seconds=o["stop_timeout"]))
    docker_config = _needs("docker", "the Docker runtime", lambda: _docker_config(o))
    from .credentials import CredentialPolicy

    drainer = Drainer.from_url(
        app.database_url,
        config=config,
        docker=docker_config,
        credentials=CredentialPolicy(o["env_prefixes"], o["directories"]),
        drain_timeout=timedelta(seconds=o["drain_timeout"]),
        webhook_timeout=timedelta(seconds=o["webhook_timeout"]),
    )
    drainer.install_signal_handlers()
    server = None
    if o["metrics_port"] is not None:
        exporter = _needs("metrics", "--metrics-port", lambda: importlib.import_module("switcher.exporter"))
        server = exporter.MetricsServer(drainer, o["metrics_port"], o["metrics_host"])
        log.info("serving /metrics and /healthz", extra={"port": server.port, "host": o["metrics_host"]})
    clean = drainer.run()
    if server is not None:
        server.close()
    drainer.close()
    if not clean:
        logging.shutdown()
        os._exit(3)  # handler threads are still running; do not wait for them at exit


def _docker_config(o: dict[str, Any]) -> Any:
    from .runtime.docker import DockerConfig

    return DockerConfig(
        mode=o["restart_mode"],
        stop_timeout=timedelta(seconds=o["stop_timeout"]),
        reload_timeout=timedelta(seconds=o["reload_timeout"]),
        credential_env=o["credential_env"],
    )


def _needs(extra: str, what: str, load: Callable[[], T]) -> T:
    try:
        return load()
    except ImportError as error:
        raise SwitcherError(
            f"{what} needs `pip install 'switcher[{extra}]'` ({error.name} is missing)"
        ) from None


@cli.command()
@option(
    "--runtime",
    type=click.Choice(("auto", "docker", "simulated")),
    default="auto",
    help="docker: real containers; simulated: restarts recorded, not performed; auto: docker if it answers",
)
@pass_app
def demo(app: App, runtime: str) -> None:
    """Play the whole job with real processes on a throwaway database, then check every guarantee."""
    from .demo import run_demo

    code = run_demo(app.database_url, runtime=runtime)
    if code:
        raise SystemExit(code)


# -- the entry point ---------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _from_environment(error: click.ClickException, argv: Sequence[str]) -> str:
    """Which variable a bad value came from, when it did not come from the command line."""
    if not isinstance(error, click.BadParameter) or error.param is None or error.ctx is None:
        return ""
    envvar = error.param.resolve_envvar_value(error.ctx)
    named = error.param.envvar or (
        f"{error.ctx.auto_envvar_prefix}_{(error.param.name or '').upper()}"
        if error.ctx.auto_envvar_prefix
        else None
    )
    given = any(arg.split("=")[0] in error.param.opts for arg in argv)
    return f" (from {named})" if envvar is not None and named and not given else ""


def _wants_json(argv: Sequence[str]) -> bool:
    flag = os.environ.get("SWITCHER_JSON", "").lower() in ("1", "true", "yes", "on")
    return flag or "--json" in argv


def _error(message: str, code: int, as_json: bool) -> int:
    text = _one_line(message)
    if as_json:
        click.echo(json.dumps({"error": text, "exit_code": code}), err=True)
    else:
        click.echo(f"switcher: {text}", err=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # a name with an undecodable byte must still print
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    as_json = _wants_json(args)
    try:
        cli.main(args, prog_name="switcher", standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except SystemExit as done:
        return int(done.code or 0)
    except (click.exceptions.Abort, KeyboardInterrupt):
        return 130
    except click.ClickException as error:
        return _error(error.format_message() + _from_environment(error, args), EXIT_USAGE, as_json)
    except SwitcherError as error:
        return _error(str(error), EXIT_USAGE, as_json)
    except DBAPIError as error:
        return _error(f"database error: {error.orig or error}", EXIT_DATABASE, as_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
