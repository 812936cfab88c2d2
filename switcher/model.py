"""Plain values that cross the public API."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta


class FailureKind(enum.StrEnum):
    """Why a request failed, as far as switching is concerned."""

    RATE_LIMIT = "rate_limit"
    AUTH = "auth"


class Outcome(enum.StrEnum):
    SWITCHED = "switched"
    """The agent now uses another subscription; a restart message was enqueued."""
    STALE = "stale"
    """The report is about a subscription (or generation) the agent has already left."""
    NO_ALTERNATIVE = "no_alternative"
    """The failure was recorded; no other subscription is enabled, cool, and under its limit."""
    DISABLED = "disabled"
    """The failure was recorded; auto-switch is off cluster-wide."""
    NOT_SUBSCRIPTION_BACKED = "not_subscription_backed"
    """The agent has no subscription assigned; there is nothing to switch."""
    UNCHANGED = "unchanged"
    """``assign()`` to the subscription the agent already has: nothing to do."""


@dataclass(frozen=True, slots=True)
class SwitchResult:
    """What a report (or an assignment) did.

    ``old_subscription`` is the agent's subscription when the call decided, ``new_subscription`` the one
    after it (equal unless ``SWITCHED``); ``generation`` is the agent's generation after the call;
    ``restart_id`` is the outbox message carrying the restart (``SWITCHED`` only). ``report_id`` identifies
    the report: a retry with the same id returns this same answer (then ``replayed`` is true).
    """

    outcome: Outcome
    agent: str
    old_subscription: str | None
    new_subscription: str | None
    generation: int
    restart_id: int | None = None
    report_id: str | None = None
    replayed: bool = False

    @property
    def switched(self) -> bool:
        return self.outcome is Outcome.SWITCHED


@dataclass(frozen=True, slots=True)
class Subscription:
    name: str
    credential_ref: str
    priority: int
    max_agents: int | None
    enabled: bool
    assigned: int
    cooling_until: datetime | None = None
    """While in cooldown (a failure inside the window), when the cooldown ends; else None."""


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    subscription: str | None
    container: str | None
    generation: int
    placement: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    auto_switch: bool
    cooldown_window: timedelta
    webhook: str | None = None
    """Credential reference of the URL that hears about every switch (``env:NAME``), or None."""
    retention: timedelta = timedelta(days=30)
    """How long failures, switches and finished messages are kept."""


@dataclass(frozen=True, slots=True)
class AgentTarget:
    """What a restart must apply: the agent's *current* assignment, read when the handler runs."""

    agent: str
    container: str | None
    placement: str | None
    generation: int
    subscription: str | None
    credential_ref: str | None
