"""Choosing the subscription an agent moves to.

Only *eligible* subscriptions are candidates: enabled, not the failed one, no failure inside the
cooldown window, under ``max_agents``. A policy ranks them; the switch takes the first that still has
room under its row lock. A policy can only order (or leave out) candidates, never add one, so no
policy can break a guarantee.

Built-in policies are applied by the database itself. Any object with a ``rank`` method works too:
the switch then reads the candidates first (one more round trip) and passes its ranking on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol


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


class BuiltinPolicy:
    """A policy the database applies itself (``ORDER BY`` in ``switcher.handle_failure_v2``), saving the
    round trip a Python policy needs to read the candidates. ``rank`` states the same order in Python."""

    priority_first: ClassVar[bool]
    """Order by ``priority`` before load (else load before ``priority``)."""

    def rank(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        raise NotImplementedError


class LeastLoaded(BuiltinPolicy):
    """The default: fewest assigned agents, then lowest ``priority`` value, then oldest (lowest id).

    Spreading a herd over the alternatives keeps one of them from becoming the next to hit its limit.
    """

    priority_first = False

    def rank(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        return sorted(candidates, key=lambda c: (c.assigned, c.priority, c.id))


class ByPriority(BuiltinPolicy):
    """Lowest ``priority`` value first, then fewest assigned agents, then id.

    Fills preferred accounts first.
    """

    priority_first = True

    def rank(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        return sorted(candidates, key=lambda c: (c.priority, c.assigned, c.id))
