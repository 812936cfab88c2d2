"""switcher: move an agent off a failing subscription exactly once, across processes, and deliver the new
credential to its container after commit, through an outbox."""

from .api import AsyncSwitcher, Switcher, database_url
from .classify import classify_failure
from .errors import (
    AgentRestarting,
    AlreadyExists,
    CapacityExceeded,
    CredentialError,
    CredentialRefused,
    DatabaseURLError,
    InUse,
    InvalidInput,
    MigrationError,
    SwitchBusy,
    SwitcherError,
    UnknownAgent,
    UnknownSubscription,
)
from .executions import AsyncExecution, Execution
from .model import Agent, FailureKind, Outcome, Settings, Subscription, SwitchResult
from .selection import BuiltinPolicy, ByPriority, Candidate, LeastLoaded, SelectionPolicy

__all__ = [
    "Agent",
    "AgentRestarting",
    "AlreadyExists",
    "AsyncExecution",
    "AsyncSwitcher",
    "BuiltinPolicy",
    "ByPriority",
    "Candidate",
    "CapacityExceeded",
    "CredentialError",
    "CredentialRefused",
    "DatabaseURLError",
    "Execution",
    "FailureKind",
    "InUse",
    "InvalidInput",
    "LeastLoaded",
    "MigrationError",
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
