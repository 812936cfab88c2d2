"""Typed errors. Each message says what to change, and never what a credential holds."""

from __future__ import annotations


class SwitcherError(Exception):
    """Base of every error switcher raises on purpose."""


class InvalidInput(SwitcherError, ValueError):
    """An argument is missing, of the wrong type, empty, or absurd; nothing was written."""


class UnknownAgent(SwitcherError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown agent {name!r}: register it first with add_agent()")
        self.name = name


class UnknownSubscription(SwitcherError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown subscription {name!r}: register it first with add_subscription()")
        self.name = name


class AlreadyExists(SwitcherError):
    """A name is taken: subscriptions and agents are unique by name."""


class InUse(SwitcherError):
    """Something still depends on what was to be removed (agents on a subscription)."""


class CapacityExceeded(SwitcherError):
    """An explicit assignment would put a subscription over its ``max_agents``."""


class SwitchBusy(SwitcherError):
    """The agent's row stayed locked by another switch for longer than ``lock_timeout``.

    Nothing was written. Retrying later is safe: the other switch may already have moved the agent, in
    which case the retry answers ``STALE``.
    """


class AgentRestarting(SwitcherError):
    """``execution()`` waited ``gate_timeout`` for a drainer to finish restarting the agent.

    The agent's container is being replaced with a new credential; try again shortly.
    """


class DatabaseURLError(SwitcherError, ValueError):
    """The database URL is not a PostgreSQL URL switcher can use."""


class MigrationError(SwitcherError):
    """The schema cannot be migrated (usually: the role may not create or alter schema ``switcher``)."""


class Undeliverable(SwitcherError):
    """An outbox message that no retry can deliver: a drainer moves it to ``dead`` at once."""


class CredentialError(SwitcherError):
    """A credential reference cannot be resolved here. The message names the reference, never a secret."""


class CredentialRefused(CredentialError, Undeliverable):
    """A credential reference lies outside what this drainer may read (``--credential-env-prefix``,
    ``--credential-dir``). Nothing was read; retrying cannot help."""
