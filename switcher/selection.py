"""Choosing the subscription an agent moves to.

The switch asks the database for *eligible* candidates (enabled, not the failed one, no failure inside
the cooldown window) with their current load, drops the ones already full, and lets a policy rank the
rest. It then tries them in that order; a capacity-limited candidate is re-checked under its row lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Candidate:
    id: int
    name: str
    priority: int
    max_agents: int | None
    assigned: int

    @property
    def has_room(self) -> bool:
        return self.max_agents is None or self.assigned < self.max_agents


class SelectionPolicy(Protocol):
    """Rank eligible candidates, best first. Returning fewer candidates excludes the rest."""

    def rank(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]: ...


class LeastLoaded:
    """The default: fewest assigned agents, then lowest ``priority`` value, then oldest (lowest id).

    Spreading a herd over the alternatives keeps one of them from becoming the next to hit its limit.
    """

    def rank(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        return sorted(candidates, key=lambda c: (c.assigned, c.priority, c.id))


class ByPriority:
    """Lowest ``priority`` value first, then fewest assigned agents, then id.

    Fills preferred accounts first.
    """

    def rank(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        return sorted(candidates, key=lambda c: (c.priority, c.assigned, c.id))
