"""The demo's guarantee checks: plain functions of what the demo recorded, so they can be tested alone."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..model import Agent
from .scenario import AGENTS, PHASES, Answer


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


Applied = tuple[str | None, str | None]
"""(subscription, secret) as the agent's container has it."""


def check(
    *,
    answers: Sequence[Answer],
    switches: Sequence[Mapping[str, Any]],
    agents: Sequence[Agent],
    deliveries: Sequence[Mapping[str, Any]],
    applied: Mapping[str, Applied],
    expected_secrets: Mapping[str, str],
    unfinished: int,
    notifications: Mapping[str, int],
) -> list[Check]:
    """Every guarantee the demo shows, checked against what was recorded."""
    checks = []

    per_burst = {
        (index, agent): sum(
            1
            for i, _, a, is_late, o in answers
            if i == index and a == agent and not is_late and o == "switched"
        )
        for index, phase in enumerate(PHASES)
        for agent in phase.bursts
    }
    repeated = [k for k, n in Counter((s["agent"], s["old_subscription"]) for s in switches).items() if n > 1]
    checks.append(
        Check(
            "one switch per burst",
            all(n == 1 for n in per_burst.values()) and not repeated,
            f"switches per burst {list(per_burst.values())}; repeated switch rows: {len(repeated)}",
        )
    )

    late = [o for _, _, _, is_late, o in answers if is_late]
    by_name = {a.name: a for a in agents}
    moves = by_name["alice"].generation
    expected_moves = sum(1 for p in PHASES if "alice" in p.bursts)
    checks.append(
        Check(
            "no cascade",
            all(o == "stale" for o in late) and moves == expected_moves,
            f"{len(late)} late reports, answered {sorted(set(late))}; alice moved {moves} times",
        )
    )

    overlaps = 0
    for agent in AGENTS:
        runs = sorted((d["start"], d["end"]) for d in deliveries if d["agent"] == agent)
        overlaps += sum(1 for (_, end), (start, _) in itertools.pairwise(runs) if start < end)
    checks.append(
        Check(
            "no overlapping deliveries",
            overlaps == 0,
            f"{len(deliveries)} deliveries, {overlaps} overlapping",
        )
    )

    mismatches = []
    for name, moved in by_name.items():
        if moved.generation == 0:
            continue
        expected = (moved.subscription, expected_secrets.get(moved.subscription or ""))
        if applied.get(name) != expected:
            mismatches.append(f"{name}: has {applied.get(name, (None, None))[0]}, assigned {expected[0]}")
    checks.append(
        Check(
            "every moved agent runs its current credential",
            not mismatches,
            "; ".join(mismatches) or f"{sum(a.generation > 0 for a in agents)} moved agents checked",
        )
    )
    checks.append(Check("every message handled", unfinished == 0, f"{unfinished} not done"))

    wanted = {f"switch-{s['id']}" for s in switches}
    extra = {k: n for k, n in notifications.items() if k not in wanted or n > 1}
    checks.append(
        Check(
            "one notification per switch",
            set(notifications) == wanted and not extra,
            f"{len(wanted)} switches, {sum(notifications.values())} notifications"
            + (f"; unexpected {extra}" if extra else ""),
        )
    )
    return checks
