"""switcher: move an agent off a failing subscription exactly once, across processes, and restart its
container after commit through an outbox."""

from .api import AsyncSwitcher, Switcher, database_url
from .classify import classify_failure
from .errors import (
    AlreadyExists,
    CapacityExceeded,
    DatabaseURLError,
    InvalidInput,
    SwitchBusy,
    SwitcherError,
    UnknownAgent,
    UnknownSubscription,
)
from .model import Agent, FailureKind, Outcome, Settings, Subscription, SwitchResult
from .selection import BuiltinPolicy, ByPriority, Candidate, LeastLoaded, SelectionPolicy

__all__ = [
    "Agent",
    "AlreadyExists",
    "AsyncSwitcher",
    "BuiltinPolicy",
    "ByPriority",
    "Candidate",
    "CapacityExceeded",
    "DatabaseURLError",
    "FailureKind",
    "InvalidInput",
    "LeastLoaded",
    "Outcome",
    "SelectionPolicy",
    "Settings",
    "Subscription",
    "SwitchBusy",
    "SwitchResult",
    "Switcher",
    "SwitcherError",
    "UnknownAgent",
    "UnknownSubscription",
    "classify_failure",
    "database_url",
]
