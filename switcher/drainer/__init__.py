"""The outbox drainer: delivers committed messages (restarts, notifications) after commit, at least once.
See ``loop`` for how it is put together."""

from .config import Backoff, DrainerConfig, default_worker_id
from .handlers import AgentDelivery, Handler, Handlers, NotifySwitch, RestartAgent, default_handlers
from .leases import Abandoned, Claim, LeaseLost
from .loop import Drainer, check_lease

__all__ = [
    "Abandoned",
    "AgentDelivery",
    "Backoff",
    "Claim",
    "Drainer",
    "DrainerConfig",
    "Handler",
    "Handlers",
    "LeaseLost",
    "NotifySwitch",
    "RestartAgent",
    "check_lease",
    "default_handlers",
    "default_worker_id",
]
