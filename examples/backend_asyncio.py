"""An asyncio backend: several chat requests of one agent fail at once; one switch happens.

    python examples/backend_asyncio.py     # SWITCHER_DATABASE_URL, or an embedded PostgreSQL

The same holds when the requests come from different processes or hosts: the lock is a row lock in
PostgreSQL, not in this process.
"""

from __future__ import annotations

import asyncio

from _database import database_url

from switcher import AsyncSwitcher, FailureKind, Switcher


async def chat(asw: AsyncSwitcher, agent: str, used: str) -> str:
    """Stand-in for a chat request that got an auth-class error from the provider."""
    result = await asw.handle_failure(
        agent, failed_subscription=used, kind=FailureKind.AUTH, message="401 OAuth token has expired"
    )
    return result.outcome.value


async def serve(url: str) -> None:
    async with AsyncSwitcher.from_url(url) as asw:
        used = await asw.current_subscription("support-bot")
        outcomes = await asyncio.gather(*(chat(asw, "support-bot", used or "") for _ in range(5)))
        print(f"5 concurrent failures: {sorted(outcomes)}")
        print(f"support-bot now uses {await asw.current_subscription('support-bot')}")


def main() -> None:
    with database_url() as url:
        with Switcher.from_url(url) as sw:  # setup, as an operator would (or `switcher subscription add`)
            sw.migrate()
            sw.add_subscription("primary", credential_ref="env:PRIMARY_TOKEN")
            sw.add_subscription("backup", credential_ref="env:BACKUP_TOKEN")
            sw.add_agent("support-bot", subscription="primary", container="agent-support-bot")
        asyncio.run(serve(url))


if __name__ == "__main__":
    main()
