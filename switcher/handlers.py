"""Handlers: what a drainer does with each kind of outbox message.

A handler is any callable taking a ``Message`` and returning a short result string; it runs outside
any transaction and raises to ask for a retry. Host applications plug their own kinds in (a
hot-reload call, a webhook) by adding to the registry given to the ``Drainer``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from sqlalchemy import Engine

from . import registry
from .model import AgentTarget
from .outbox import RESTART_AGENT, Message

Handler = Callable[[Message], str]
Handlers = Mapping[str, Handler]


class Runtime(Protocol):
    def apply(self, target: AgentTarget, message: Message) -> str: ...


class RestartAgent:
    """The ``restart_agent`` handler: apply the agent's *current* assignment through a runtime.

    Reading the assignment when the handler runs, not from the message, is what makes a burst of
    switches end with the latest one applied, whichever message of the burst runs last.
    """

    def __init__(self, engine: Engine, runtime: Runtime) -> None:
        self.engine = engine
        self.runtime = runtime

    def __call__(self, message: Message) -> str:
        with self.engine.connect() as conn:
            target = registry.agent_target(conn, message.agent_id)
        if target is None:
            return "no_agent"
        return self.runtime.apply(target, message)


def default_handlers(engine: Engine, runtime: Runtime) -> dict[str, Handler]:
    return {RESTART_AGENT: RestartAgent(engine, runtime)}
