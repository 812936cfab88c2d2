-- Subscriptions, agents and the cluster-wide settings: what operators register and every process reads.
-- Load per subscription is the sum of its load shards (see track_load_v2 in switch.sql); cooldown is
-- derived from failures. No column here is written by every switch.


-- name: add_subscription
INSERT INTO switcher.subscriptions (name, credential_ref, priority, max_agents, enabled)
VALUES (:name, :credential_ref, :priority, :max_agents, :enabled)
ON CONFLICT (name) DO NOTHING
RETURNING id

-- name: subscriptions
-- Each subscription with its load and, while it cools down after a failure, when the cooldown ends.
SELECT s.name, s.credential_ref, s.priority, s.max_agents, s.enabled,
       (SELECT COALESCE(sum(l.agents), 0) FROM switcher.subscription_load l
        WHERE l.subscription_id = s.id) AS assigned,
       NULLIF(GREATEST((SELECT max(f.occurred_at) FROM switcher.failures f WHERE f.subscription_id = s.id)
                       + st.cooldown_window, now()), now()) AS cooling_until
FROM switcher.subscriptions s CROSS JOIN switcher.settings st
WHERE st.id = 1 AND (CAST(:name AS text) IS NULL OR s.name = :name)
ORDER BY s.id

-- name: set_subscription
-- Change what is given (NULL: leave it).
UPDATE switcher.subscriptions
SET enabled = COALESCE(:enabled, enabled),
    credential_ref = COALESCE(:credential_ref, credential_ref),
    updated_at = now()
WHERE name = :name
RETURNING id

-- name: remove_subscription
-- Refused by agents_subscription_id_fkey while agents use it; its failures go with it.
DELETE FROM switcher.subscriptions WHERE name = :name RETURNING id

-- name: reserve_for_agent
-- A new agent on a subscription takes the same lock as a switch onto it, so capacity holds against both.
SELECT s.id, s.max_agents,
       s.max_agents IS NULL OR switcher.reserve_v2(s.id, NULL, NULL, true) = 'reserved' AS has_room
FROM switcher.subscriptions s WHERE s.name = :name

-- name: set_lock_timeout
SELECT set_config('lock_timeout', :lock_timeout, true)

-- name: add_agent
INSERT INTO switcher.agents (name, subscription_id, container, placement)
VALUES (:name, :subscription_id, :container, :placement)
ON CONFLICT (name) DO NOTHING
RETURNING id

-- name: agents
SELECT a.name, s.name AS subscription, a.container, a.placement, a.generation
FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
WHERE CAST(:name AS text) IS NULL OR a.name = :name
ORDER BY a.id

-- name: remove_agent
-- Its history, messages, executions and delivery state go with it.
DELETE FROM switcher.agents WHERE name = :name RETURNING id

-- name: agent_target
-- What a restart applies: the agent's assignment as it is now, not as it was when the message was written.
SELECT a.name AS agent, a.container, a.placement, a.generation, s.name AS subscription, s.credential_ref
FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
WHERE a.id = :agent_id

-- name: settings
SELECT auto_switch, cooldown_window, webhook, retention FROM switcher.settings WHERE id = 1

-- name: update_settings
-- Change what is given (NULL: leave it); an empty webhook removes it.
UPDATE switcher.settings
SET auto_switch = COALESCE(:auto_switch, auto_switch),
    cooldown_window = COALESCE(CAST(:cooldown_window AS interval), cooldown_window),
    webhook = CASE WHEN CAST(:webhook AS text) IS NULL THEN webhook ELSE NULLIF(:webhook, '') END,
    retention = COALESCE(CAST(:retention AS interval), retention),
    updated_at = now()
WHERE id = 1
RETURNING auto_switch, cooldown_window, webhook, retention

-- name: recent_switches
SELECT s.id, a.name AS agent, f.name AS old_subscription, t.name AS new_subscription, s.kind,
       s.generation, s.reason, s.switched_at
FROM switcher.switches s
JOIN switcher.agents a ON a.id = s.agent_id
LEFT JOIN switcher.subscriptions f ON f.id = s.from_subscription_id
LEFT JOIN switcher.subscriptions t ON t.id = s.to_subscription_id
ORDER BY s.id DESC
LIMIT :limit

-- name: prune
-- One batch of history past the retention period, never inside the cooldown window (failures there keep
-- subscriptions cooling). The oldest rows come first in the heap, so each scan stops early.
WITH cutoff AS (
    SELECT now() - GREATEST(st.retention, st.cooldown_window) AS t FROM switcher.settings st WHERE st.id = 1
), failures AS (
    DELETE FROM switcher.failures f USING (
        SELECT x.id FROM switcher.failures x, cutoff WHERE x.occurred_at < cutoff.t LIMIT :batch) old
    WHERE f.id = old.id RETURNING 1
), switches AS (
    DELETE FROM switcher.switches s USING (
        SELECT x.id FROM switcher.switches x, cutoff WHERE x.switched_at < cutoff.t LIMIT :batch) old
    WHERE s.id = old.id RETURNING 1
), messages AS (
    DELETE FROM switcher.outbox o USING (
        SELECT x.id FROM switcher.outbox x, cutoff
        WHERE x.status IN ('done', 'superseded') AND x.updated_at < cutoff.t LIMIT :batch) old
    WHERE o.id = old.id RETURNING 1
)
SELECT (SELECT count(*) FROM failures) AS failures, (SELECT count(*) FROM switches) AS switches,
       (SELECT count(*) FROM messages) AS messages

-- name: load_drift
-- Subscriptions whose load shards disagree with a count of their agents (switcher check).
SELECT s.name, l.load, c.agents
FROM switcher.subscriptions s
CROSS JOIN LATERAL (SELECT COALESCE(sum(x.agents), 0) AS load FROM switcher.subscription_load x
                    WHERE x.subscription_id = s.id) l
CROSS JOIN LATERAL (SELECT count(*) AS agents FROM switcher.agents a WHERE a.subscription_id = s.id) c
WHERE l.load <> c.agents
