"""Container runtimes: what applies an agent's current assignment to the container it runs in.

A runtime gets a ``Delivery``: the target (the agent's assignment as it is now) and what the database
keeps about deliveries to that agent. The runtime does the container work; the delivery records, before
the first destructive step, what must be restored if it is interrupted, and fences every destructive
step on the drainer's lease.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from ..model import AgentTarget
from ..outbox import DeliveryState


class Delivery(Protocol):
    target: AgentTarget

    def state(self) -> DeliveryState:
        """What earlier deliveries to the agent left (an interrupted recreate's intent, the generation
        applied)."""
        ...

    def secret(self) -> str | None:
        """The credential of the target's subscription, resolved within the drainer's allowlist."""
        ...

    def fence(self) -> None:
        """Raise ``LeaseLost`` unless this drainer still holds the message (and renew it): called before
        every destructive step, so that a drainer that lost its message to another does no harm."""
        ...

    def intended_running(self, observed: bool) -> bool:
        """Record ``observed`` as the run state to restore, unless an interrupted delivery recorded one
        already; the one that holds. Called before the first destructive step."""
        ...

    def drained(self) -> AbstractContextManager[None]:
        """Close the agent's gate, wait for its executions to end (up to the drain timeout), and keep new
        executions waiting until the block ends."""
        ...

    def applied(self) -> None:
        """The target generation is applied and the container is in its intended run state."""
        ...

    def abandoned(self) -> None:
        """The old container is back as it was; nothing is left to restore."""
        ...


class Runtime(Protocol):
    def apply(self, delivery: Delivery) -> str:
        """Apply ``delivery.target`` to the agent's container; a short result (``reloaded``,
        ``recreated``, ``restarted``, ``not_running``, ``no_container``, ``already_applied``). Raise to
        have the message retried; raise ``Undeliverable`` when no retry can help."""
        ...
