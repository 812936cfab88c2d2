"""A scheduler (sync API): a task failed with a rate limit; ask switcher to move its agent.

.venv/bin/python examples/scheduler_sync.py   # SWITCHER_DATABASE_URL, or an embedded PostgreSQL
"""

from __future__ import annotations

from _database import database_url, register

from switcher import Outcome, Switcher, classify_failure


def run_task(agent: str, subscription: str | None) -> tuple[int, str]:
    """Stand-in for the real task: the provider answers 429."""
    return 429, "rate_limit_error: Number of request tokens has exceeded your per-minute rate limit"


def main() -> None:
    with database_url() as url, Switcher.from_url(url) as sw:
        register(
            sw,
            "nightly-report",
            {"team-a": "env:SWITCHER_CRED_TEAM_A", "team-b": "env:SWITCHER_CRED_TEAM_B"},
            container="agent-nightly-report",
        )

        # The execution registers the task (a drain-aware restart waits for it) and pins its snapshot:
        # the subscription and generation the task really runs under.
        with sw.execution("nightly-report") as task:
            status, error = run_task("nightly-report", task.subscription)
            kind = classify_failure(error, status=status)
            if kind is None:
                print("not a subscription problem: retry or report it, do not switch")
                return
            result = task.report_failure(kind, error)
        if result.outcome is Outcome.SWITCHED:
            print(
                f"moved from {result.old_subscription} to {result.new_subscription}; "
                f"restart message {result.restart_id} waits for a drainer"
            )
        else:
            print(f"no switch: {result.outcome.value} (now on {result.new_subscription})")


if __name__ == "__main__":
    main()
