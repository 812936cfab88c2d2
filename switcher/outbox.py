"""The outbox: restart messages written inside the switch's transaction, delivered after commit.

This module is the one door to ``switcher.outbox``. Enqueueing coalesces with a still-pending message
for the same agent and notifies drainers, which the transaction's commit releases.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from sqlalchemy import Connection, text

from .schema import NOTIFY_CHANNEL

RESTART_AGENT = "restart_agent"

_ENQUEUE = text(
    """
    WITH message AS (
        INSERT INTO switcher.outbox AS o (kind, agent_id, generation, payload)
        VALUES (:kind, :agent_id, :generation, CAST(:payload AS jsonb))
        ON CONFLICT (agent_id, kind) WHERE status = 'pending'
        DO UPDATE SET generation = excluded.generation,
                      payload = excluded.payload,
                      attempts = 0,
                      available_at = now(),
                      updated_at = now()
        RETURNING o.id
    )
    SELECT id, pg_notify(:channel, id::text) FROM message
    """
)


def enqueue(
    conn: Connection, *, kind: str, agent_id: int, generation: int, payload: Mapping[str, object]
) -> int:
    """Add (or refresh the pending) message of ``kind`` for the agent; return its id.

    Runs in the caller's transaction: the message and its NOTIFY exist only if that transaction commits.
    ``payload`` must hold names only, never a credential.
    """
    row = conn.execute(
        _ENQUEUE,
        {
            "kind": kind,
            "agent_id": agent_id,
            "generation": generation,
            "payload": json.dumps(payload),
            "channel": NOTIFY_CHANNEL,
        },
    ).one()
    return int(row.id)
