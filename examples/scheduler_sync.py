"""A scheduler (sync API): a task failed with a rate limit; ask switcher to move its agent.

python examples/scheduler_sync.py      # SWITCHER_DATABASE_URL, or an embedded PostgreSQL
"""

from __future__ import annotations

from _database import database_url

from switcher import Outcome, Switcher, classify_failure


def run_task(agent: str, subscription: str) -> tuple[int, str]:
    """Stand-in for the real task: the provider answers 429."""
    return 429, "rate_limit_error: Number of request tokens has exceeded your per-minute rate limit"


def main() -> None:
    with database_url() as url, Switcher.from_url(url) as sw:
        sw.migrate()
        sw.add_subscription("team-a", credential_ref="env:TEAM_A_TOKEN")
        sw.add_subscription("team-b", credential_ref="env:TEAM_B_TOKEN")
        sw.add_agent("nightly-report", subscription="team-a", container="agent-nightly-report")

        # Take the snapshot before the request: it is the subscription the request really uses.
        used = sw.current_subscription("nightly-report")
        status, error = run_task("nightly-report", used or "")
        kind = classify_failure(error, status=status)
        if kind is None:
            print("not a subscription problem: retry or report it, do not switch")
            return
        result = sw.handle_failure("nightly-report", failed_subscription=used, kind=kind, message=error)
        if result.outcome is Outcome.SWITCHED:
            print(
                f"moved from {result.old_subscription} to {result.new_subscription}; "
                f"restart message {result.restart_id} waits for a drainer"
            )
        else:
            print(f"no switch: {result.outcome.value} (now on {result.new_subscription})")


if __name__ == "__main__":
    main()
