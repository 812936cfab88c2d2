"""Apply an agent's current assignment to its container, through the Docker Engine API.

Two modes:

* ``recreate`` (default) -- the only mode that applies a new credential by itself: stop, remove and
  create the container again with the same image, command, environment, labels, mounts, ports and
  networks, plus the resolved credential in an environment variable (``SWITCHER_CREDENTIAL`` by
  default) and the labels ``switcher.agent``, ``switcher.subscription``, ``switcher.generation``;
  then start it if it was running. A stopped container is left stopped, with the new configuration.
* ``restart`` -- ``docker restart``, for agents that fetch their credential when they start.

Both are idempotent: a redelivered message that is already applied (the container's
``switcher.generation`` label is at least the agent's generation, or -- in restart mode -- the
container started after the message was enqueued) does nothing.

The old container is renamed, not removed, until its replacement exists: if creating the new one
fails, the old one gets its name back (and is started again if it was running). A drainer that dies
half-way leaves the renamed container, which the next delivery finds and finishes with.

Results: ``recreated``, ``restarted``, ``not_running``, ``no_container``, ``already_applied``.
Errors reaching Docker (``DockerException``, and ``requests`` connection errors, which are not
``DockerException``) propagate, so the drainer retries with backoff.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Literal

import docker
from docker.errors import NotFound
from docker.models.containers import Container

from ..credentials import resolve
from ..model import AgentTarget
from ..outbox import Message

log = logging.getLogger(__name__)

Mode = Literal["recreate", "restart"]
LABEL_AGENT = "switcher.agent"
LABEL_SUBSCRIPTION = "switcher.subscription"
LABEL_GENERATION = "switcher.generation"
_PARKED = "-switcher-replaced-"


class DockerRuntime:
    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        base_url: str | None = None,
        mode: Mode = "recreate",
        credential_env: str = "SWITCHER_CREDENTIAL",
        stop_timeout: int = 10,
    ) -> None:
        if mode not in ("recreate", "restart"):
            raise ValueError(f"mode must be 'recreate' or 'restart', got {mode!r}")
        self._client = client
        self.base_url = base_url
        self.mode = mode
        self.credential_env = credential_env
        self.stop_timeout = stop_timeout

    @property
    def client(self) -> docker.DockerClient:
        # Created on first use (from DOCKER_HOST etc. unless base_url is given), so a drainer starts,
        # and retries with backoff, while Docker is still away.
        if self._client is None:
            self._client = docker.DockerClient(base_url=self.base_url) if self.base_url else docker.from_env()
        return self._client

    def apply(self, target: AgentTarget, message: Message) -> str:
        container = self._find(target)
        if container is None:
            return "no_container"
        if self.mode == "restart":
            return self._restart(container, message)
        return self._recreate(container, target)

    def _find(self, target: AgentTarget) -> Container | None:
        containers = self.client.containers
        if target.container:
            try:
                return containers.get(target.container)
            except NotFound:
                pass
        labelled = containers.list(all=True, filters={"label": f"{LABEL_AGENT}={target.agent}"})
        if labelled:
            return labelled[0]
        if target.container:  # left renamed by a drainer that died half-way through a recreate
            parked = containers.list(all=True, filters={"name": f"^/{target.container}{_PARKED}"})
            if parked:
                return parked[0]
        return None

    def _restart(self, container: Container, message: Message) -> str:
        state = container.attrs["State"]
        if not state.get("Running"):
            return "not_running"
        if _parse_docker_time(state["StartedAt"]) > message.enqueued_at:
            return "already_applied"
        container.restart(timeout=self.stop_timeout)
        return "restarted"

    def _recreate(self, old: Container, target: AgentTarget) -> str:
        labels = old.attrs["Config"].get("Labels") or {}
        if int(labels.get(LABEL_GENERATION, -1)) >= target.generation:
            return "already_applied"
        name = target.container or str(old.name)
        was_running = bool(old.attrs["State"].get("Running"))
        secret = resolve(target.credential_ref) if target.credential_ref else None
        spec = self._spec(old.attrs, target, secret)
        if was_running:
            old.stop(timeout=self.stop_timeout)
        if old.name == name:  # (else it was parked by an earlier, interrupted delivery)
            old.rename(f"{name}{_PARKED}{old.short_id}")
        api = self.client.api
        created: str | None = None
        try:
            created = api.create_container(name=name, **spec["create"])["Id"]
            for network, endpoint in spec["extra_networks"].items():
                api.connect_container_to_network(created, network, aliases=endpoint.get("Aliases"))
            if was_running:
                api.start(created)
        except Exception:
            if created is not None:
                api.remove_container(created, force=True)
            old.rename(name)
            if was_running:
                old.start()
            raise
        old.remove(force=True)
        log.info(
            "recreated container",
            extra={"agent": target.agent, "container": name, "generation": target.generation},
        )
        return "recreated" if was_running else "not_running"

    def _spec(self, attrs: dict[str, Any], target: AgentTarget, secret: str | None) -> dict[str, Any]:
        config, host = attrs["Config"], dict(attrs["HostConfig"])
        env = [e for e in config.get("Env") or [] if not e.startswith(f"{self.credential_env}=")]
        if secret is not None:
            env.append(f"{self.credential_env}={secret}")
        labels = dict(config.get("Labels") or {})
        labels.update(
            {
                LABEL_AGENT: target.agent,
                LABEL_SUBSCRIPTION: target.subscription or "",
                LABEL_GENERATION: str(target.generation),
            }
        )
        # Keep the data of volumes without a name in the config (anonymous ones) by mounting them by name.
        binds = list(host.get("Binds") or [])
        bound = {b.split(":")[1] for b in binds if ":" in b}
        for mount in attrs.get("Mounts") or []:
            if mount.get("Type") == "volume" and mount["Destination"] not in bound:
                binds.append(f"{mount['Name']}:{mount['Destination']}:{'rw' if mount.get('RW') else 'ro'}")
        host["Binds"] = binds or None

        networks = dict(attrs.get("NetworkSettings", {}).get("Networks") or {})
        primary = host.get("NetworkMode") or "default"
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


def _parse_docker_time(value: str) -> datetime:
    """Docker's RFC 3339 times carry nanoseconds, which ``fromisoformat`` does not take."""
    head, _, fraction = value.rstrip("Z").partition(".")
    parsed = datetime.fromisoformat(head).replace(tzinfo=UTC)
    if fraction:
        parsed = parsed.replace(microsecond=int(fraction[:6].ljust(6, "0")))
    return parsed
