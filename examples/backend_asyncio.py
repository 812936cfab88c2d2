"""An asyncio backend: several chat requests of one agent fail at once; one switch happens.

    .venv/bin/python examples/backend_asyncio.py   # SWITCHER_DATABASE_URL, or an embedded PostgreSQL

The same holds when the requests come from different processes or hosts: the lock is a row lock in
PostgreSQL, not in this process.
"""

from __future__ import annotations

import asyncio

from _database import database_url, register

from switcher import AsyncSwitcher, FailureKind, Switcher


async def chat(asw: AsyncSwitcher, agent: str, in_flight: asyncio.Barrier) -> str:
    """One chat request. The execution pins the snapshot and makes a drain-aware restart wait for it."""
    async with asw.execution(agent) as ex:
        # All five requests are in flight before any fails. (A request that arrives after the switch
        # waits at the gate for the agent's restart, which no drainer delivers in this example.)
        await in_flight.wait()
        # ... call the model with the credential of ex.subscription; it answers 401 ...
        result = await ex.report_failure(FailureKind.AUTH, "401 OAuth token has expired")
        return result.outcome.value


async def serve(url: str) -> None:
    async with AsyncSwitcher.from_url(url) as asw:
        in_flight = asyncio.Barrier(5)
        outcomes = await asyncio.gather(*(chat(asw, "support-bot", in_flight) for _ in range(5)))
        print(f"5 concurrent failures: {sorted(outcomes)}")
        print(f"support-bot now uses {await asw.current_subscription('support-bot')}")


def main() -> None:
    with database_url() as url:
        with Switcher.from_url(url) as sw:
            register(
                sw,
                "support-bot",
                {"primary": "env:SWITCHER_CRED_PRIMARY", "backup": "env:SWITCHER_CRED_BACKUP"},
                container="agent-support-bot",
            )
        asyncio.run(serve(url))


if __name__ == "__main__":
    main()
