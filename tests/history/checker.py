"""The history checker: pure functions over what a run recorded.

Inputs: the ``switches`` table (per agent, in id order), the ``failures`` table (one row per report that
the database answered with a recorded outcome), the callers' logs (every report issued, and the final
answer of each call that was not killed in flight) and the capacity samples. Each check returns its
violations, each with the details needed to find it again.

Reports whose caller was killed in flight, or whose answer is an error, may or may not have taken effect:
nothing is asserted about them beyond what the tables must satisfy on their own (chains, generations,
one failure row and at most one switch per report, capacity).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SWITCHED = "switched"
STALE = "stale"
RECORDED = frozenset({"switched", "no_alternative", "disabled"})
"""Outcomes the database records as a failure row (``stale`` and the unknown ones write nothing)."""


@dataclass(frozen=True, slots=True)
class SwitchRow:
    id: int
    agent: str
    from_: str | None
    to: str
    generation: int
    manual: bool = False
    """An ``assign()``, which has no report (none in the workload)."""


@dataclass(frozen=True, slots=True)
class FailureRow:
    report_id: str
    agent: str
    subscription: str
    outcome: str
    new_subscription: str | None
    generation: int | None
    restart_id: int | None


@dataclass(frozen=True, slots=True)
class Call:
    """A report a caller issued (logged before the call)."""

    report_id: str
    agent: str
    snapshot: str | None
    failed_generation: int | None
    caller: str


@dataclass(frozen=True, slots=True)
class Answer:
    """The final answer of a call, as its caller logged it; ``outcome`` is ``error:<Name>`` for errors."""

    report_id: str
    agent: str
    snapshot: str | None
    failed_generation: int | None
    outcome: str
    old: str | None = None
    new: str | None = None
    generation: int | None = None
    restart_id: int | None = None
    replayed: bool = False
    caller: str = ""
    pid: int = 0
    t: float = 0.0
    answer_report_id: str | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    loads: Mapping[str, int]
    limits: Mapping[str, int | None]


@dataclass(frozen=True, slots=True)
class Violation:
    check: str
    detail: str


@dataclass(frozen=True)
class History:
    initial: Mapping[str, str | None]
    """Each agent's subscription before the run."""
    final_agents: Mapping[str, tuple[str | None, int]]
    """Each agent's (subscription, generation) after the run."""
    final_loads: Mapping[str, int]
    limits: Mapping[str, int | None]
    switches: Sequence[SwitchRow]
    failures: Sequence[FailureRow]
    issued: Sequence[Call]
    answers: Sequence[Answer]
    samples: Sequence[Sample] = field(default_factory=tuple)


CHAIN = "1 chain: each switch starts where the previous one ended"
GENERATIONS = "2 generations: +1 per switch"
RECORDED_ANSWERS = "3 answers recorded: a SWITCHED answer has its switch and its failure row"
ONCE = "4 once: one failure row and at most one switch per report"
STALE_WROTE_NOTHING = "5 stale: a STALE answer wrote nothing"
CAPACITY = "6 capacity: max_agents never exceeded"
LOADS = "7 loads: final loads equal agents per subscription"


def _by_agent(switches: Iterable[SwitchRow]) -> dict[str, list[SwitchRow]]:
    chains: dict[str, list[SwitchRow]] = defaultdict(list)
    for s in sorted(switches, key=lambda s: s.id):
        chains[s.agent].append(s)
    return chains


def check_chain(h: History) -> list[Violation]:
    found = []
    chains = _by_agent(h.switches)
    for agent in sorted(set(h.initial) | set(chains)):
        expected = h.initial.get(agent)
        for s in chains.get(agent, []):
            if s.from_ != expected:
                found.append(
                    Violation(
                        CHAIN,
                        f"{agent}: switch {s.id} (gen {s.generation}) from {s.from_}, "
                        f"but the agent was on {expected}",
                    )
                )
            expected = s.to
        final = h.final_agents.get(agent, (None, 0))[0]
        if agent in h.final_agents and final != expected:
            found.append(Violation(CHAIN, f"{agent}: ends on {final}, its last switch went to {expected}"))
    return found


def check_generations(h: History) -> list[Violation]:
    found = []
    chains = _by_agent(h.switches)
    for agent in sorted(set(h.initial) | set(chains)):
        previous = 0
        for s in chains.get(agent, []):
            if s.generation != previous + 1:
                found.append(
                    Violation(
                        GENERATIONS, f"{agent}: switch {s.id} has generation {s.generation} after {previous}"
                    )
                )
            previous = s.generation
        if agent in h.final_agents and h.final_agents[agent][1] != previous:
            found.append(
                Violation(
                    GENERATIONS,
                    f"{agent}: generation {h.final_agents[agent][1]}, its last switch made {previous}",
                )
            )
    return found


def check_answers_recorded(h: History) -> list[Violation]:
    """Every answer that records a failure matches its failure row; a SWITCHED one also its switch
    (same agent and generation, from its old to its new subscription, off the reported snapshot: G2)."""
    found = []
    failures = {f.report_id: f for f in h.failures}
    switches = {(s.agent, s.generation): s for s in h.switches}
    for a in h.answers:
        if a.outcome not in RECORDED:
            continue
        where = f"report {a.report_id} ({a.agent}, {a.outcome}{', replayed' if a.replayed else ''})"
        if a.answer_report_id is not None and a.answer_report_id != a.report_id:
            found.append(Violation(RECORDED_ANSWERS, f"{where}: answered for report {a.answer_report_id}"))
        f = failures.get(a.report_id)
        if f is None:
            found.append(Violation(RECORDED_ANSWERS, f"{where}: no failure row has this report id"))
        else:
            row = (f.agent, f.outcome, f.generation, f.subscription)
            if row != (a.agent, a.outcome, a.generation, a.old):
                found.append(
                    Violation(
                        RECORDED_ANSWERS,
                        f"{where}: answered {(a.agent, a.outcome, a.generation, a.old)}, "
                        f"its failure row says {row}",
                    )
                )
            if a.outcome == SWITCHED and (f.new_subscription, f.restart_id) != (a.new, a.restart_id):
                found.append(
                    Violation(
                        RECORDED_ANSWERS,
                        f"{where}: answered to {a.new} with restart {a.restart_id}, "
                        f"its failure row says {f.new_subscription} with restart {f.restart_id}",
                    )
                )
        if a.outcome != SWITCHED:
            continue
        s = switches.get((a.agent, a.generation or 0))
        if s is None:
            found.append(
                Violation(RECORDED_ANSWERS, f"{where}: no switch of {a.agent} made generation {a.generation}")
            )
            continue
        if (s.from_, s.to) != (a.old, a.new):
            found.append(
                Violation(
                    RECORDED_ANSWERS,
                    f"{where}: answered {a.old} -> {a.new}, switch {s.id} went {s.from_} -> {s.to}",
                )
            )
        if a.snapshot is not None and s.from_ != a.snapshot:
            found.append(
                Violation(
                    RECORDED_ANSWERS,
                    f"{where}: reported about {a.snapshot}, but switch {s.id} moved "
                    f"the agent off {s.from_} (G2: a cascade)",
                )
            )
        if a.failed_generation is not None and s.generation != a.failed_generation + 1:
            found.append(
                Violation(
                    RECORDED_ANSWERS,
                    f"{where}: reported about generation {a.failed_generation}, but "
                    f"switch {s.id} made generation {s.generation}",
                )
            )
    return found


def check_once(h: History) -> list[Violation]:
    """At most one failure row per report id, and each of those from a report a caller issued; each
    switch accounted for by exactly one report's failure row; never two different answers for one
    report."""
    found = []
    issued = {c.report_id for c in h.issued}
    for report_id, n in Counter(f.report_id for f in h.failures).items():
        if n > 1:
            found.append(Violation(ONCE, f"report {report_id}: {n} failure rows"))
    found += [
        Violation(
            ONCE,
            f"failure row of {f.agent} ({f.outcome}, gen {f.generation}) has report id {f.report_id}, "
            "which no caller issued",
        )
        for f in h.failures
        if f.report_id not in issued
    ]
    found += _switches_claimed_once(h)
    answers: dict[str, list[Answer]] = defaultdict(list)
    for a in h.answers:
        answers[a.report_id].append(a)
    for report_id, group in answers.items():
        kept = {(a.outcome, a.generation, a.new) for a in group if not a.outcome.startswith("error:")}
        if len(kept) > 1:
            found.append(Violation(ONCE, f"report {report_id}: different answers {sorted(kept, key=str)}"))
    return found


def _switches_claimed_once(h: History) -> list[Violation]:
    """Each switch (but a manual one) is the switch of exactly one report's failure row, and each
    'switched' failure row has its switch."""
    found = []
    claims: dict[tuple[str, int | None], list[FailureRow]] = defaultdict(list)
    for f in h.failures:
        if f.outcome == SWITCHED:
            claims[(f.agent, f.generation)].append(f)
    for s in h.switches:
        rows = claims.get((s.agent, s.generation), [])
        if s.manual or (len(rows) == 1 and rows[0].new_subscription == s.to):
            continue
        found.append(
            Violation(
                ONCE,
                f"switch {s.id} of {s.agent} (gen {s.generation}, {s.from_} -> {s.to}) is claimed by "
                f"{len(rows)} reports' failure rows: {[(r.report_id, r.new_subscription) for r in rows]}",
            )
        )
    switched = {(s.agent, s.generation) for s in h.switches}
    found += [
        Violation(
            ONCE,
            f"reports {[r.report_id for r in rows]} recorded a switch of {key[0]} to generation {key[1]} "
            "that the switches table does not have",
        )
        for key, rows in claims.items()
        if key not in switched
    ]
    return found


def check_stale_wrote_nothing(h: History) -> list[Violation]:
    """A STALE final answer leaves no trace: no failure row under its report id (a retry of a report
    whose first attempt committed must find that answer and replay it, never answer STALE)."""
    found = []
    failures = {f.report_id: f for f in h.failures}
    for a in h.answers:
        if a.outcome != STALE:
            continue
        where = f"report {a.report_id} ({a.agent}, about {a.snapshot})"
        f = failures.get(a.report_id)
        if f is not None:
            found.append(
                Violation(
                    STALE_WROTE_NOTHING,
                    f"{where} answered STALE, but its failure row says "
                    f"{f.outcome} (gen {f.generation}, to {f.new_subscription})",
                )
            )
        if a.replayed:
            found.append(Violation(STALE_WROTE_NOTHING, f"{where}: a STALE answer marked replayed"))
        if a.old != a.new:
            found.append(Violation(STALE_WROTE_NOTHING, f"{where}: STALE, yet {a.old} -> {a.new}"))
    return found


def check_capacity(h: History) -> list[Violation]:
    found = []
    final = Sample(float("inf"), h.final_loads, h.limits)
    for sample in [*h.samples, final]:
        for name, limit in sample.limits.items():
            load = sample.loads.get(name, 0)
            if limit is not None and load > limit:
                when = "at the end" if sample is final else f"at {sample.t:.3f}"
                found.append(Violation(CAPACITY, f"{name}: {load} agents {when}, max_agents {limit}"))
    return found


def check_loads(h: History) -> list[Violation]:
    counts = Counter(sub for sub, _ in h.final_agents.values() if sub is not None)
    found = []
    for name in sorted(set(h.final_loads) | set(counts)):
        if h.final_loads.get(name, 0) != counts.get(name, 0):
            found.append(
                Violation(
                    LOADS, f"{name}: load {h.final_loads.get(name, 0)}, {counts.get(name, 0)} agents on it"
                )
            )
    return found


CHECKS: dict[str, Callable[[History], list[Violation]]] = {
    CHAIN: check_chain,
    GENERATIONS: check_generations,
    RECORDED_ANSWERS: check_answers_recorded,
    ONCE: check_once,
    STALE_WROTE_NOTHING: check_stale_wrote_nothing,
    CAPACITY: check_capacity,
    LOADS: check_loads,
}


def check_all(h: History) -> dict[str, list[Violation]]:
    """Every check's violations, by check name (an empty list: it holds)."""
    return {name: check(h) for name, check in CHECKS.items()}


def read_logs(paths: Iterable[Path]) -> tuple[list[Call], list[Answer]]:
    """The calls and answers in the callers' logs. A last line cut short by SIGKILL is ignored."""
    issued: list[Call] = []
    answers: list[Answer] = []
    for path in paths:
        content = path.read_text(encoding="utf-8")
        lines = content.split("\n")
        if lines and lines[-1] and not content.endswith("\n"):
            lines.pop()  # written in part when the process was killed
        for line in filter(None, lines):
            record: dict[str, Any] = json.loads(line)
            if record["event"] == "call":
                issued.append(
                    Call(
                        record["report_id"],
                        record["agent"],
                        record["snapshot"],
                        record["failed_generation"],
                        record["caller"],
                    )
                )
            elif record["event"] == "answer":
                answers.append(
                    Answer(
                        report_id=record["report_id"],
                        agent=record["agent"],
                        snapshot=record["snapshot"],
                        failed_generation=record["failed_generation"],
                        outcome=record["outcome"],
                        old=record.get("old"),
                        new=record.get("new"),
                        generation=record.get("generation"),
                        restart_id=record.get("restart_id"),
                        replayed=bool(record.get("replayed", False)),
                        caller=record["caller"],
                        pid=record["pid"],
                        t=record["t"],
                        answer_report_id=record.get("answer_report_id"),
                    )
                )
    return issued, answers
