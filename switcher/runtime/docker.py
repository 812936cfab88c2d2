"""Deliver an agent's current assignment to its container, through the Docker Engine API
(``switcher[docker]``).

Modes (``switcher drain --restart-mode``):

* ``auto`` (default) -- hot reload when the container declares a reload hook, else a drain-aware
  recreate; a reload that fails falls back to the drain-aware recreate.
* ``reload`` -- hot reload only: a running container without a hook is an error (the message goes dead).
* ``recreate`` -- drain-aware recreate: the only way to put a new credential into a container that cannot
  take it while running. Same image, command, environment, labels, mounts, ports and networks, plus the
  credential in an environment variable (``SWITCHER_CREDENTIAL``) and the labels ``switcher.agent``,
  ``switcher.subscription``, ``switcher.generation``.
* ``restart`` -- drain-aware ``docker restart``, for agents that fetch their credential when they start
  (its run state recorded first, as for a recreate, so an interrupted restart is finished).

Reload hooks, as labels of the agent's container:

* ``switcher.reload-command`` -- run with ``docker exec`` (``sh -c`` unless it is a JSON array of
  arguments); the credential comes on its standard input, never in its arguments or environment, which
  holds ``SWITCHER_AGENT``, ``SWITCHER_SUBSCRIPTION`` and ``SWITCHER_GENERATION``. Exit status 0: applied.
* ``switcher.reload-url`` -- HTTP POST of ``{agent, subscription, generation, credential}`` (JSON) from the
  drainer; a 2xx answer: applied.

The generation a reload applied is recorded in the database (a running container's labels cannot change),
so a redelivery of it does nothing. An agent that reloads must keep its credential across its own
restarts (say, in a volume): Docker restarts it with the environment it was created with.

A recreate that a fault interrupts (the drainer killed at any step, Docker unreachable, PostgreSQL
restarting) is finished by the next delivery, whatever the step:

1. the run state to restore is recorded in the database before the first destructive step, and a
   redelivery takes it from there, never from a container that the earlier attempt stopped;
2. the old container is stopped, then *parked* (renamed ``<name>-switcher-replaced-<id>``) until its
   replacement exists; parked containers are found (for an agent found by label, even when nothing else
   is left) and removed by every delivery;
3. a container under the agent's name that already carries the target generation is the replacement an
   earlier attempt created: it is connected to the networks of the parked old container it lacks, and
   started if it should run, instead of being created again;
4. each destructive step runs only while the drainer still holds the message's lease (``fence``).

When Docker refuses a step (a 4xx or 5xx answer, as opposed to not answering), the old container gets its
name back and, if it ran, is started again: the agent is never left worse off. A refusal that no retry
can change (4xx) sends the message to ``dead``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import socket
import time
import warnings
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, cast

import docker
from docker.errors import APIError, NotFound
from docker.models.containers import Container

from .. import metrics
from ..errors import InvalidInput, Undeliverable
from ..http import post_json
from ..model import AgentTarget
from ..redact import redact
from . import Delivery

log = logging.getLogger(__name__)

Mode = Literal["auto", "reload", "recreate", "restart"]
MODES: tuple[Mode, ...] = ("auto", "reload", "recreate", "restart")
LABEL_AGENT = "switcher.agent"
LABEL_SUBSCRIPTION = "switcher.subscription"
LABEL_GENERATION = "switcher.generation"
LABEL_RELOAD_COMMAND = "switcher.reload-command"
LABEL_RELOAD_URL = "switcher.reload-url"
PARKED = "-switcher-replaced-"
DOCKER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
"""What Docker accepts as a container name: no container can have any other."""


@dataclass(frozen=True)
class DockerConfig:
    mode: Mode = "auto"
    stop_timeout: timedelta = timedelta(seconds=10)
    """How long ``docker stop`` waits before it kills (a fenced step must fit in the lease)."""
    reload_timeout: timedelta = timedelta(seconds=30)
    """How long a reload hook may take before it counts as failed."""
    credential_env: str = "SWITCHER_CREDENTIAL"
    """The environment variable a recreated container finds its credential in."""
    base_url: str | None = None
    """The Docker Engine API (default: DOCKER_HOST etc., as for the docker CLI)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInput(f"restart mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for what, value in (("stop_timeout", self.stop_timeout), ("reload_timeout", self.reload_timeout)):
            if not timedelta(0) <= value <= timedelta(hours=1):
                raise InvalidInput(f"{what} must be between 0 and 1 hour, got {value}")
        if not self.credential_env.isidentifier():
            raise InvalidInput(f"credential_env must be a variable name, got {self.credential_env!r}")


class ReloadFailed(Exception):
    """A reload hook did not apply the credential."""


@dataclass(frozen=True, slots=True)
class Hook:
    kind: Literal["command", "url"]
    value: str


@dataclass
class Found:
    """An agent's containers: the one under its name, and parked ones left by interrupted recreates."""

    name: str | None
    named: Container | None
    parked: list[Container] = field(default_factory=list)


class DockerRuntime:
    def __init__(self, config: DockerConfig | None = None, client: docker.DockerClient | None = None) -> None:
        self.config = config or DockerConfig()
        self._client = client

    @property
    def client(self) -> docker.DockerClient:
        # Made on first use, so a drainer starts (and retries with backoff) while Docker is still away.
        if self._client is None:
            base_url = self.config.base_url
            self._client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        return self._client

    def apply(self, delivery: Delivery) -> str:
        target = delivery.target
        found = self._find(target)
        if found.named is None and not found.parked:
            return "no_container"
        state = delivery.state()
        settled = state.intended_running is None and not found.parked
        named = found.named
        if settled and named is not None:
            applied = -1 if state.applied_generation is None else state.applied_generation
            if max(applied, _generation(named)) >= target.generation:
                return "already_applied"
        # Restart mode also finishes its own interrupted restart (intent recorded, nothing parked); a
        # parked container or a replacement of the target generation is a recreate's, finished as one.
        if (
            self.config.mode == "restart"
            and named is not None
            and not found.parked
            and _generation(named) < target.generation
        ):
            return self._restart(named, delivery)
        if settled and named is not None and self.config.mode != "recreate" and _running(named):
            hook = _hook(named)
            if hook is None and self.config.mode == "reload":
                raise Undeliverable(
                    f"restart mode is reload, but container {found.name} declares no "
                    f"{LABEL_RELOAD_COMMAND} or {LABEL_RELOAD_URL} label"
                )
            if hook is not None and self._reloaded(named, hook, delivery):
                return "reloaded"
        return self._recreate(found, delivery)

    # -- finding ---------------------------------------------------------------------------------------

    def _find(self, target: AgentTarget) -> Found:
        containers = self.client.containers
        name, named = target.container, None
        if name:
            named = self._named(name)
        else:  # an agent registered without a container name: the container labelled with the agent
            labelled = containers.list(all=True, filters={"label": f"{LABEL_AGENT}={target.agent}"})
            current = [c for c in labelled if PARKED not in str(c.name)]
            if current:
                named = current[0]
                name = str(named.name)
            elif labelled:
                # Only parked ones: a recreate interrupted before it created the replacement. The name
                # to finish it under is the newest parked one's, without its suffix.
                newest = max(labelled, key=lambda c: str(c.attrs.get("Created", "")))
                name = str(newest.name).rpartition(PARKED)[0] or None
        if not name:
            return Found(None, None)
        prefix = f"{name}{PARKED}"
        parked = [
            c for c in containers.list(all=True, filters={"name": prefix}) if str(c.name).startswith(prefix)
        ]
        parked.sort(key=lambda c: str(c.attrs.get("Created", "")), reverse=True)  # newest first
        return Found(name, named, parked)

    def _named(self, name: str) -> Container | None:
        """The container with exactly this name. ``containers.get`` also takes an ID prefix when no name
        matches, so a hex-only name whose container is gone (or parked) could resolve to an unrelated
        container: only an exact name counts."""
        if not DOCKER_NAME.fullmatch(name):
            return None
        try:
            container = self.client.containers.get(name)
        except NotFound:
            return None
        return container if container.name == name else None

    # -- reload ----------------------------------------------------------------------------------------

    def _reloaded(self, container: Container, hook: Hook, delivery: Delivery) -> bool:
        """Hand the credential to the running agent; False (logged, counted) when the hook failed."""
        target = delivery.target
        secret = delivery.secret() or ""
        delivery.fence()
        try:
            if hook.kind == "command":
                self._exec(container, hook.value, target, secret)
            else:
                self._post(hook.value, target, secret)
        except ReloadFailed as error:
            if self.config.mode == "reload":
                raise
            metrics.RELOAD_FAILURES.labels(hook.kind).inc()
            log.warning(
                "hot reload failed, recreating instead: %s",
                error,
                extra={"agent": target.agent, "generation": target.generation},
            )
            return False
        delivery.applied()
        return True

    def _exec(self, container: Container, command: str, target: AgentTarget, secret: str) -> None:
        argv = _argv(command)
        api = self.client.api
        environment = {
            "SWITCHER_AGENT": target.agent,
            "SWITCHER_SUBSCRIPTION": target.subscription or "",
            "SWITCHER_GENERATION": str(target.generation),
        }
        try:
            exec_id = api.exec_create(container.id, argv, stdin=True, environment=environment)["Id"]
            stream = api.exec_start(exec_id, socket=True)
        except APIError as error:  # refused (the container paused, restarting, gone): not applied
            raise ReloadFailed(f"Docker refused the reload command: {_explain(error)}") from None
        raw = cast(socket.socket, getattr(stream, "_sock", stream))
        timeout = self.config.reload_timeout.total_seconds()
        deadline = time.monotonic() + timeout
        output = b""
        try:
            raw.settimeout(timeout)
            raw.sendall(secret.encode())
            raw.shutdown(socket.SHUT_WR)  # end of the command's standard input
            while chunk := raw.recv(65536):
                output = (output + chunk)[-4096:]
        except OSError as error:
            raise ReloadFailed(f"reload command did not finish within {timeout:g} s ({error})") from None
        finally:
            # The exec's HTTP response still holds the socket: closing our reference would leave the
            # descriptor open until garbage collection. Detach it and close the descriptor itself.
            if isinstance(raw, socket.socket):
                socket.close(raw.detach())
            else:
                raw.close()
        try:
            pause = 0.002  # it has closed its output: its exit is usually a moment away
            while (status := api.exec_inspect(exec_id))["Running"] and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
        except APIError as error:
            raise ReloadFailed(f"Docker could not inspect the reload command: {_explain(error)}") from None
        if status["Running"]:  # it closed its output but has not exited: no exit status to go by
            raise ReloadFailed(f"reload command still running after {timeout:g} s (reload timeout)")
        if status["ExitCode"] != 0:
            said = redact(_printable(output))[-300:]
            raise ReloadFailed(f"reload command exited with {status['ExitCode']}: {said}")

    def _post(self, url: str, target: AgentTarget, secret: str) -> None:
        body = {
            "agent": target.agent,
            "subscription": target.subscription,
            "generation": target.generation,
            "credential": secret,
        }
        try:
            status = post_json(url, body, timeout=self.config.reload_timeout.total_seconds())
        except OSError as error:
            raise ReloadFailed(f"reload URL did not answer ({type(error).__name__})") from None
        if not 200 <= status < 300:
            raise ReloadFailed(f"reload URL answered {status}")

    # -- restart ---------------------------------------------------------------------------------------

    def _restart(self, container: Container, delivery: Delivery) -> str:
        # Recorded before the restart: one interrupted between its stop and its start leaves the container
        # stopped, and the redelivery must start it rather than take "stopped" for the agent's state.
        if not delivery.intended_running(_running(container)):
            delivery.applied()  # it fetches the credential whenever it starts
            return "not_running"
        with delivery.drained():
            delivery.fence()
            container.restart(timeout=self._stop_seconds)  # starts a stopped one too
        delivery.applied()
        return "restarted"

    # -- recreate --------------------------------------------------------------------------------------

    def _recreate(self, found: Found, delivery: Delivery) -> str:
        target = delivery.target
        assert found.name is not None
        named, parked = found.named, list(found.parked)
        fresh = named if named is not None and _generation(named) >= target.generation else None
        old = named if named is not None and fresh is None else (parked[0] if parked else None)
        spec: dict[str, Any] | None = None
        if fresh is None:
            assert old is not None
            # Before the intent is recorded: a refused or missing credential must leave no intent behind.
            spec = self._spec(old.attrs, target, delivery.secret())
        # Nothing recorded and only a parked container left (by a drainer that predates recorded intents):
        # an agent is meant to run.
        observed = _running(named) if named is not None else True
        running = delivery.intended_running(observed)
        if fresh is not None:  # an earlier attempt created the replacement; finish its work
            self._finish(fresh, old, running, delivery)
        else:
            assert old is not None and spec is not None
            if old is named:
                parked.append(old)
            self._replace(found.name, old, spec, running, delivery)
        for leftover in parked:
            delivery.fence()
            _remove(leftover)
        delivery.applied()
        log.info(
            "recreated container",
            extra={"agent": target.agent, "container": found.name, "generation": target.generation},
        )
        return "recreated" if running else "not_running"

    def _finish(self, fresh: Container, old: Container | None, running: bool, delivery: Delivery) -> None:
        """Finish a replacement an earlier attempt created: connect the networks of the old container it
        was not connected to yet (that attempt stopped between its connects), then start it."""
        missing: dict[str, dict[str, Any]] = {}
        if old is not None:  # still parked: the earlier attempt did not get to its removal
            connected = (fresh.attrs.get("NetworkSettings") or {}).get("Networks") or {}
            missing = {n: e for n, e in _networks(old.attrs)[1].items() if n not in connected}
        start = running and not _running(fresh)
        if not missing and not start:
            return
        with delivery.drained() if start else nullcontext():
            for network, endpoint in missing.items():
                delivery.fence()
                _connect(self.client.api, str(fresh.id), network, endpoint)
            if start:
                delivery.fence()
                fresh.start()

    def _replace(
        self, name: str, old: Container, spec: dict[str, Any], running: bool, delivery: Delivery
    ) -> None:
        api = self.client.api
        created: str | None = None
        try:
            with delivery.drained() if running else nullcontext():
                if old.name == name:
                    if _running(old):
                        delivery.fence()
                        old.stop(timeout=self._stop_seconds)
                    delivery.fence()
                    old.rename(f"{name}{PARKED}{old.short_id}")
                delivery.fence()
                created = api.create_container(name=name, **spec["create"])["Id"]
                for network, endpoint in spec["extra_networks"].items():
                    _connect(api, created, network, endpoint)
                if running:
                    delivery.fence()
                    api.start(created)
        except APIError as error:  # Docker answered, and refused: put the old container back
            self._roll_back(name, old, created, running, delivery)
            if error.is_client_error() and error.status_code != 409:
                raise Undeliverable(f"Docker refused to recreate {name}: {error.explanation}") from None
            raise

    def _roll_back(
        self, name: str, old: Container, created: str | None, running: bool, delivery: Delivery
    ) -> None:
        delivery.fence()
        if created is not None:
            self.client.api.remove_container(created, force=True)
        old.reload()
        if old.name != name:
            old.rename(name)
        if running and not _running(old):
            old.start()
        delivery.abandoned()
        log.warning("put the old container back", extra={"agent": delivery.target.agent, "container": name})

    @property
    def _stop_seconds(self) -> int:
        return round(self.config.stop_timeout.total_seconds())

    def _spec(self, attrs: dict[str, Any], target: AgentTarget, secret: str | None) -> dict[str, Any]:
        config, host = attrs["Config"], dict(attrs["HostConfig"])
        credential_env = self.config.credential_env
        env = [e for e in config.get("Env") or [] if not e.startswith(f"{credential_env}=")]
        if secret is not None:
            env.append(f"{credential_env}={secret}")
        labels = dict(config.get("Labels") or {})
        labels.update(
            {
                LABEL_AGENT: target.agent,
                LABEL_SUBSCRIPTION: target.subscription or "",
                LABEL_GENERATION: str(target.generation),
            }
        )
        # Keep the data of volumes without a name in the config (anonymous ones) by mounting them by name.
        volumes = {
            m["Destination"]: m.get("Name") for m in attrs.get("Mounts") or [] if m.get("Type") == "volume"
        }
        mounts = []
        for declared in host.get("Mounts") or []:  # --mount: copied, but an anonymous volume gets its name
            mount = dict(declared)
            if mount.get("Type") == "volume" and not mount.get("Source") and volumes.get(mount.get("Target")):
                mount["Source"] = volumes[mount["Target"]]
            mounts.append(mount)
        host["Mounts"] = mounts or None
        binds = list(host.get("Binds") or [])
        # Targets already mounted (by -v or --mount): another mount there is refused as a duplicate.
        bound = {b.split(":")[1] for b in binds if ":" in b} | {m.get("Target") for m in mounts}
        for mount in attrs.get("Mounts") or []:
            if mount.get("Type") == "volume" and mount["Destination"] not in bound:
                binds.append(f"{mount['Name']}:{mount['Destination']}:{'rw' if mount.get('RW') else 'ro'}")
        host["Binds"] = binds or None

        networking, extra = _networks(attrs)
        short_id = attrs["Id"][:12]
        hostname = config.get("Hostname")
        return {
            "create": {
                "image": attrs["Image"],
                "command": config.get("Cmd"),
                "entrypoint": config.get("Entrypoint"),
                "environment": env,
                "labels": labels,
                "hostname": hostname if hostname and hostname != short_id else None,
                "domainname": config.get("Domainname") or None,
                "user": config.get("User") or None,
                "working_dir": config.get("WorkingDir") or None,
                "tty": bool(config.get("Tty")),
                "stdin_open": bool(config.get("OpenStdin")),
                "ports": config.get("ExposedPorts"),
                "stop_signal": config.get("StopSignal"),
                "healthcheck": config.get("Healthcheck"),
                "detach": True,
                "host_config": host,
                "networking_config": networking,
            },
            "extra_networks": extra,
        }


def _networks(attrs: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """A container's networks, as a replacement is made with them: the primary network's endpoint (the
    create's networking config; None for the built-in ones) and the extra networks to connect."""
    networks = dict((attrs.get("NetworkSettings") or {}).get("Networks") or {})
    primary = attrs["HostConfig"].get("NetworkMode") or "default"
    short_id = attrs["Id"][:12]

    def endpoint(settings: dict[str, Any]) -> dict[str, Any]:
        aliases = [a for a in settings.get("Aliases") or [] if a != short_id]
        result: dict[str, Any] = {"Aliases": aliases or None}
        if settings.get("IPAMConfig"):
            result["IPAMConfig"] = settings["IPAMConfig"]
        return result

    networking = None
    if primary in networks and primary not in ("bridge", "host", "none", "default"):
        networking = {"EndpointsConfig": {primary: endpoint(networks[primary])}}
    extra = {n: endpoint(s) for n, s in networks.items() if primary not in (n, "host")}
    return networking, extra


def _connect(api: Any, container_id: str, network: str, endpoint: dict[str, Any]) -> None:
    """Connect to an extra network as the old container was: its aliases and any static address."""
    addresses = endpoint.get("IPAMConfig") or {}
    api.connect_container_to_network(
        container_id,
        network,
        aliases=endpoint.get("Aliases"),
        ipv4_address=addresses.get("IPv4Address") or None,
        ipv6_address=addresses.get("IPv6Address") or None,
    )


def _argv(command: str) -> list[str]:
    """The reload command's arguments: a JSON array of strings, or a shell command."""
    if not command.lstrip().startswith("["):
        return ["/bin/sh", "-c", command]
    try:
        argv = json.loads(command)
    except ValueError:
        raise ReloadFailed(f"label {LABEL_RELOAD_COMMAND} starts with [ but is not valid JSON") from None
    if not argv or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ReloadFailed(f"label {LABEL_RELOAD_COMMAND} must be a JSON array of strings")
    return argv


def _explain(error: APIError) -> str:
    return redact(str(error.explanation or error))[-300:]


def _running(container: Container) -> bool:
    return bool(container.attrs["State"].get("Running"))


def _generation(container: Container) -> int:
    try:
        return int((container.attrs["Config"].get("Labels") or {}).get(LABEL_GENERATION, -1))
    except ValueError:
        return -1


def _hook(container: Container) -> Hook | None:
    labels = container.attrs["Config"].get("Labels") or {}
    if command := labels.get(LABEL_RELOAD_COMMAND):
        return Hook("command", command)
    if url := labels.get(LABEL_RELOAD_URL):
        return Hook("url", url)
    return None


def _remove(container: Container) -> None:
    with suppress(NotFound):
        container.remove(force=True)


def _printable(output: bytes) -> str:
    return "".join(c if c.isprintable() else " " for c in output.decode(errors="replace")).strip()


def docker_answers(base_url: str | None = None) -> bool:
    """True when a Docker engine answers a ping (``base_url``, or DOCKER_HOST etc.)."""
    if base_url is None and "DOCKER_HOST" not in os.environ and not os.path.exists("/var/run/docker.sock"):
        return False
    # A failed ping leaves the docker SDK's socket to the garbage collector; keep that quiet here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = (
                docker.DockerClient(base_url=base_url, timeout=3) if base_url else docker.from_env(timeout=3)
            )
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()
