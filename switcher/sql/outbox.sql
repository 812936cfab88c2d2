-- The outbox: messages written in the same transaction as a switch, delivered after commit by drainers.
--
-- Life of a message:
--   pending --claim--> running --complete--> done
--      ^                  |  \--fail, attempts left--> pending (available_at = now + backoff)
--      |                  |   \-fail, none left, or refused for good--> dead --retry--> pending
--      |                  \--lease expired (its drainer died)--> pending again (or superseded)
--      \--release (shutdown before its handler started)
--   superseded: a newer pending message of the same agent and kind does the work instead.
--   cancelled: an operator withdrew a pending message.
--
-- A message about an agent (agent_id set, e.g. restart_agent) coalesces with that agent's pending message
-- of its kind, and never runs while another message of the agent runs (outbox_one_running_idx). An event
-- (agent_id NULL, e.g. notify_switch) is delivered once per message and runs on any drainer.
-- Every claim is a new lease with its own number (lease_no), and every change after a claim is conditional
-- on still holding that lease: a drainer whose lease ran out can change nothing, even once it has claimed
-- the same message again.
-- Each query is one statement: drainers run them in autocommit mode, one round trip each.


-- function: enqueue_v2
CREATE FUNCTION switcher.enqueue_v2(
    p_kind text, p_agent_id bigint, p_generation bigint, p_payload jsonb, p_channel text,
    OUT message_id bigint, OUT wake boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET jit = off
AS $$
-- Add a message, in the caller's transaction. A message about an agent refreshes that agent's pending
-- message of the same kind instead of adding a second one.
-- Drainers need waking (wake) for a new message, and for a refreshed one that was waiting for a retry
-- and is due now; a pending message that was due already needs no second wake-up. With p_channel, the
-- wake-up is a NOTIFY sent when this transaction commits. Without, the caller sends it after the commit:
-- PostgreSQL commits notifying transactions one at a time, flush to disk included, so a herd of switches
-- that each notify would commit in single file; a NOTIFY on its own, after the commit, costs a moment.
-- Drainers poll anyway, so a wake-up lost to a crash between the two delays a delivery, never loses it.
DECLARE
    v_waiting boolean;
BEGIN
    SELECT o.available_at > now() INTO v_waiting
    FROM switcher.outbox o
    WHERE o.agent_id = p_agent_id AND o.kind = p_kind AND o.status = 'pending';
    INSERT INTO switcher.outbox AS o (kind, agent_id, generation, payload)
    VALUES (p_kind, p_agent_id, p_generation, p_payload)
    ON CONFLICT (agent_id, kind) WHERE status = 'pending'
    DO UPDATE SET generation = excluded.generation, payload = excluded.payload, attempts = 0,
                  available_at = now(), enqueued_at = now(), updated_at = now()
    RETURNING o.id INTO message_id;
    wake := v_waiting IS NOT FALSE;
    IF wake AND p_channel IS NOT NULL THEN
        PERFORM pg_notify(p_channel, message_id::text);
    END IF;
END
$$;


-- function: claim_v2
CREATE FUNCTION switcher.claim_v2(
    p_worker text, p_limit integer, p_lease interval, p_placement text, p_kinds text[])
RETURNS TABLE (id bigint, kind text, agent_id bigint, agent text, generation bigint, payload jsonb,
               attempts integer, lease_no integer, enqueued_at timestamptz)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_sort = off
SET enable_seqscan = off
SET jit = off
AS $$
-- Lease up to p_limit due messages of the kinds this drainer handles (p_kinds) to p_worker: events, and
-- messages about agents placed with this drainer (p_placement; NULL: agents placed nowhere); oldest
-- first, one per agent, none whose agent has a message running. Two drainers that race for one agent's
-- messages anyway collide on outbox_one_running_idx.
-- It walks outbox_pending_idx in id order and stops at p_limit, however long the backlog: the loop's
-- cursor is planned to return its first rows fast, and enable_sort is off so that even a planner without
-- statistics yet (a fresh outbox that a herd fills) never reads every pending message to sort them.
DECLARE
    v_ids bigint[] := '{}';
    v_agents bigint[] := '{}';
    v_candidate record;
BEGIN
    FOR v_candidate IN
        SELECT o.id, o.agent_id
        FROM switcher.outbox o
        WHERE o.status = 'pending' AND o.available_at <= now() AND o.kind = ANY (p_kinds)
          AND (o.agent_id IS NULL OR (
               EXISTS (SELECT FROM switcher.agents a
                       WHERE a.id = o.agent_id AND a.placement IS NOT DISTINCT FROM p_placement)
               AND NOT EXISTS (SELECT FROM switcher.outbox r
                               WHERE r.agent_id = o.agent_id AND r.status = 'running')))
        ORDER BY o.id
        FOR UPDATE OF o SKIP LOCKED
    LOOP
        CONTINUE WHEN v_candidate.agent_id = ANY (v_agents);
        v_ids := v_ids || v_candidate.id;
        IF v_candidate.agent_id IS NOT NULL THEN
            v_agents := v_agents || v_candidate.agent_id;
        END IF;
        EXIT WHEN cardinality(v_ids) >= p_limit;
    END LOOP;
    RETURN QUERY
    UPDATE switcher.outbox o
    SET status = 'running', attempts = o.attempts + 1, lease_no = o.lease_no + 1,
        leased_until = now() + p_lease, leased_by = p_worker, updated_at = now()
    WHERE o.id = ANY (v_ids)
    RETURNING o.id, o.kind, o.agent_id,
              COALESCE((SELECT a.name FROM switcher.agents a WHERE a.id = o.agent_id), o.payload ->> 'agent'),
              o.generation, o.payload, o.attempts, o.lease_no, o.enqueued_at;
END
$$;


-- name: enqueue
SELECT message_id FROM switcher.enqueue_v2(:kind, :agent_id, :generation, CAST(:payload AS jsonb), :channel)

-- name: wake
-- Wake the drainers, after the commit of what they are woken for.
SELECT pg_notify(:channel, :message)

-- name: agent_id
SELECT id FROM switcher.agents WHERE name = :agent

-- name: claim
SELECT id, kind, agent_id, agent, generation, payload, attempts, lease_no, enqueued_at
FROM switcher.claim_v2(:worker, :limit, :lease, :placement, CAST(:kinds AS text[]))


-- name: heartbeat
-- Extend the leases (:ids, :lease_nos) :worker still holds; the ids of those it still holds.
UPDATE switcher.outbox o SET leased_until = now() + :lease
FROM unnest(CAST(:ids AS bigint[]), CAST(:lease_nos AS integer[])) AS h(id, lease_no)
WHERE o.id = h.id AND o.lease_no = h.lease_no AND o.status = 'running' AND o.leased_by = :worker
RETURNING o.id

-- name: complete
UPDATE switcher.outbox o
SET status = 'done', result = d.result, leased_until = NULL, updated_at = now()
FROM unnest(CAST(:ids AS bigint[]), CAST(:lease_nos AS integer[]), CAST(:results AS text[]))
     AS d(id, lease_no, result)
WHERE o.id = d.id AND o.lease_no = d.lease_no AND o.status = 'running' AND o.leased_by = :worker
RETURNING o.id

-- name: fail
-- Back to pending after :delay -- unless a newer pending message of the agent took over meanwhile
-- (superseded), or attempts are used up or the failure is final (dead). :undo_attempt undoes a claim.
UPDATE switcher.outbox o
SET status = CASE
        WHEN o.agent_id IS NOT NULL AND EXISTS (
            SELECT FROM switcher.outbox n
            WHERE n.agent_id = o.agent_id AND n.kind = o.kind AND n.status = 'pending')
            THEN 'superseded'
        WHEN :final OR o.attempts >= :max_attempts THEN 'dead'
        ELSE 'pending' END,
    attempts = o.attempts - :undo_attempt,
    available_at = now() + :delay,
    leased_until = NULL,
    last_error = COALESCE(:error, o.last_error),
    updated_at = now()
WHERE o.id = :id AND o.lease_no = :lease_no AND o.status = 'running' AND o.leased_by = :worker
RETURNING o.status

-- name: reclaim_expired
-- Messages whose drainer died (their lease ran out): due again now, superseded if a newer pending message
-- of the agent will do the work, dead if that was their last attempt.
UPDATE switcher.outbox o
SET status = CASE
        WHEN o.agent_id IS NOT NULL AND EXISTS (
            SELECT FROM switcher.outbox n
            WHERE n.agent_id = o.agent_id AND n.kind = o.kind AND n.status = 'pending')
            THEN 'superseded'
        WHEN o.attempts >= :max_attempts THEN 'dead'
        ELSE 'pending' END,
    available_at = now(),
    leased_until = NULL,
    last_error = COALESCE(o.last_error, 'its drainer stopped renewing the lease'),
    updated_at = now()
WHERE o.status = 'running' AND o.leased_until < now()
RETURNING o.id, o.status

-- name: retry
-- Another full set of attempts, due now, for finished or dead messages. Of several messages of one agent
-- and kind, only the newest comes back; the rest (and any with a newer one pending) are superseded.
UPDATE switcher.outbox o
SET status = CASE WHEN c.redundant THEN 'superseded' ELSE 'pending' END,
    attempts = 0, available_at = now(), updated_at = now()
FROM (
    SELECT x.id,
           x.agent_id IS NOT NULL AND (
               row_number() OVER (PARTITION BY x.agent_id, x.kind ORDER BY x.id DESC) > 1
               OR EXISTS (SELECT FROM switcher.outbox n
                          WHERE n.agent_id = x.agent_id AND n.kind = x.kind AND n.status = 'pending'))
               AS redundant
    FROM switcher.outbox x
    WHERE (x.id = ANY (CAST(:ids AS bigint[])) OR (:all_dead AND x.status = 'dead'))
      AND x.status IN ('dead', 'done', 'superseded', 'cancelled')
) c
WHERE o.id = c.id AND o.status IN ('dead', 'done', 'superseded', 'cancelled')
RETURNING o.id, o.status, pg_notify(:channel, o.id::text)

-- name: cancel
UPDATE switcher.outbox
SET status = 'cancelled', last_error = 'cancelled by an operator', updated_at = now()
WHERE id = ANY (CAST(:ids AS bigint[])) AND status = 'pending'
RETURNING id

-- name: seconds_until_due
SELECT EXTRACT(EPOCH FROM min(available_at) - now()) FROM switcher.outbox WHERE status = 'pending'

-- name: stats
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'dead') AS dead,
       EXTRACT(EPOCH FROM now() - min(enqueued_at) FILTER (WHERE status = 'pending'))
           AS oldest_pending_seconds
FROM switcher.outbox
WHERE status IN ('pending', 'running', 'dead')

-- name: messages
SELECT o.id, o.kind,
       COALESCE((SELECT a.name FROM switcher.agents a WHERE a.id = o.agent_id), o.payload ->> 'agent')
           AS agent,
       o.generation, o.status, o.attempts, o.available_at, o.leased_until, o.leased_by, o.last_error,
       o.result, o.payload, o.enqueued_at, o.updated_at
FROM switcher.outbox o
WHERE (CAST(:id AS bigint) IS NULL OR o.id = :id)
  AND (CAST(:status AS text) IS NULL OR o.status = :status)
ORDER BY o.id DESC
LIMIT :limit

-- name: purge
DELETE FROM switcher.outbox
WHERE status = ANY (CAST(:statuses AS text[])) AND updated_at < now() - :older_than

-- name: delivery
-- What earlier deliveries to an agent left: the run state a recreate in progress must restore, and the
-- newest generation applied.
SELECT intended_running, applied_generation FROM switcher.deliveries WHERE agent_id = :agent_id

-- name: record_intent
-- The run state to restore, recorded before the first destructive Docker step. A redelivery keeps what an
-- interrupted one recorded: by now the container may be stopped, but only by that delivery.
INSERT INTO switcher.deliveries AS d (agent_id, intended_running)
VALUES (:agent_id, :running)
ON CONFLICT (agent_id) DO UPDATE
SET intended_running = COALESCE(d.intended_running, excluded.intended_running), updated_at = now()
RETURNING d.intended_running

-- name: record_applied
-- The delivery finished: nothing left to restore, and this generation is applied.
INSERT INTO switcher.deliveries AS d (agent_id, applied_generation)
VALUES (:agent_id, :generation)
ON CONFLICT (agent_id) DO UPDATE
SET intended_running = NULL, applied_generation = GREATEST(d.applied_generation, excluded.applied_generation),
    updated_at = now()

-- name: clear_intent
UPDATE switcher.deliveries SET intended_running = NULL, updated_at = now() WHERE agent_id = :agent_id

-- name: unfinished_deliveries
-- Agents whose recreate was interrupted and that no message will finish: nothing pending or running.
SELECT a.name FROM switcher.deliveries d JOIN switcher.agents a ON a.id = d.agent_id
WHERE d.intended_running IS NOT NULL
  AND NOT EXISTS (SELECT FROM switcher.outbox o
                  WHERE o.agent_id = d.agent_id AND o.status IN ('pending', 'running'))

-- name: drainer_seen
INSERT INTO switcher.drainers AS d (worker_id, placement)
VALUES (:worker, :placement)
ON CONFLICT (worker_id) DO UPDATE SET seen_at = now(), stopped_at = NULL

-- name: drainer_stopped
UPDATE switcher.drainers SET stopped_at = now() WHERE worker_id = :worker

-- name: drainers
SELECT worker_id, placement, started_at, seen_at, stopped_at,
       EXTRACT(EPOCH FROM now() - seen_at)::float8 AS seen_seconds_ago
FROM switcher.drainers ORDER BY seen_at DESC

-- name: forget_drainers
DELETE FROM switcher.drainers WHERE seen_at < now() - interval '7 days'
