"""What the examples share: a database (SWITCHER_DATABASE_URL, or a throwaway embedded PostgreSQL, which
needs `pip install 'switcher[embedded]'`), and registering their agent so that a rerun starts afresh."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from switcher import Switcher, UnknownAgent


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    if url := os.environ.get("SWITCHER_DATABASE_URL"):
        yield url
        return
    from switcher.testing import embedded_server

    with embedded_server() as server:
        yield server.url.render_as_string(hide_password=False)


def register(sw: Switcher, agent: str, subscriptions: dict[str, str], container: str) -> None:
    """Register the subscriptions (name: credential reference) and the agent on the first of them, as an
    operator would (or `switcher subscription add`). On a rerun the agent is registered afresh: the
    examples run no drainer, and a new execution waits for an undelivered restart of its agent."""
    sw.migrate()
    existing = {s.name for s in sw.subscriptions()}
    for name, credential_ref in subscriptions.items():
        if name not in existing:
            sw.add_subscription(name, credential_ref=credential_ref)
    with contextlib.suppress(UnknownAgent):
        sw.remove_agent(agent)
    sw.add_agent(agent, subscription=next(iter(subscriptions)), container=container)
