"""Runtimes for the demo: a labelled stand-in for Docker, and a recorder around any runtime."""

from __future__ import annotations

import json
import os
import time

from ..runtime import Delivery, Runtime


class SimulatedRuntime:
    """Stands in for Docker: takes a moment, changes nothing, says what it would have applied."""

    def apply(self, delivery: Delivery) -> str:
        time.sleep(0.05)
        delivery.applied()
        return "simulated"


class RecordingRuntime:
    """Appends every delivery (who, what, when, which process, result) to a JSON-lines file."""

    def __init__(self, inner: Runtime, path: str) -> None:
        self.inner, self.path = inner, path

    def apply(self, delivery: Delivery) -> str:
        start = time.time()
        result = self.inner.apply(delivery)
        target = delivery.target
        entry = {
            "agent": target.agent,
            "subscription": target.subscription,
            "generation": target.generation,
            "result": result,
            "start": start,
            "end": time.time(),
            "pid": os.getpid(),
        }
        with open(self.path, "a") as f:  # one short line per write: appends do not interleave
            f.write(json.dumps(entry) + "\n")
        return result
