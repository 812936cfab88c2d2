-- 0001: the functions of the initial schema (its tables are created in 0001_initial.py).
-- Frozen as they were released; 0002 replaces them with versioned ones.


-- upgrade: function enqueue
CREATE FUNCTION switcher.enqueue(p_kind text, p_agent_id bigint, p_generation bigint, p_payload jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $$
-- Add, or refresh, the agent's pending message of this kind; wake the drainers on commit.
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO switcher.outbox AS o (kind, agent_id, generation, payload)
    VALUES (p_kind, p_agent_id, p_generation, p_payload)
    ON CONFLICT (agent_id, kind) WHERE status = 'pending'
    DO UPDATE SET generation = excluded.generation,
                  payload = excluded.payload,
                  attempts = 0,
                  available_at = now(),
                  enqueued_at = now(),
                  updated_at = now()
    RETURNING o.id INTO v_id;
    PERFORM pg_notify('switcher_outbox', v_id::text);
    RETURN v_id;
END
$$


-- upgrade: function candidates
CREATE FUNCTION switcher.candidates(p_failed_id bigint, p_cooldown_window interval)
RETURNS TABLE (id bigint, name text, priority integer, max_agents integer, assigned bigint)
LANGUAGE sql STABLE AS $$
    -- Enabled, not the failed one, no failure inside the cooldown window, not already full.
    SELECT s.id, s.name, s.priority, s.max_agents, l.assigned
    FROM switcher.subscriptions s
    CROSS JOIN LATERAL (
        SELECT count(*) AS assigned FROM switcher.agents a WHERE a.subscription_id = s.id
    ) l
    WHERE s.enabled
      AND s.id IS DISTINCT FROM p_failed_id
      AND NOT EXISTS (
          SELECT 1 FROM switcher.failures f
          WHERE f.subscription_id = s.id AND f.occurred_at > now() - p_cooldown_window
      )
      AND (s.max_agents IS NULL OR l.assigned < s.max_agents)
$$


-- upgrade: function reserve
CREATE FUNCTION switcher.reserve(p_subscription_id bigint, p_cooldown_window interval, p_wait boolean)
RETURNS text
LANGUAGE plpgsql AS $$
-- Lock a subscription row (FOR NO KEY UPDATE: failures can still be recorded against it) and check
-- that it has room -- and, unless p_cooldown_window is NULL (a manual assignment), that it is still
-- enabled and cool. Answers 'reserved' (the lock is kept), 'full' (the lock is released again by
-- rolling back this block's subtransaction) or 'busy' (p_wait is false and another switch holds it).
DECLARE
    v_sub record;
    v_assigned bigint;
BEGIN
    BEGIN
        IF p_wait THEN
            SELECT s.max_agents, s.enabled INTO v_sub
            FROM switcher.subscriptions s WHERE s.id = p_subscription_id
            FOR NO KEY UPDATE;
        ELSE
            SELECT s.max_agents, s.enabled INTO v_sub
            FROM switcher.subscriptions s WHERE s.id = p_subscription_id
            FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        IF NOT FOUND THEN
            RETURN 'busy';
        END IF;
        -- A new statement, so it sees what the previous holder of the lock committed.
        SELECT count(*) INTO v_assigned FROM switcher.agents a WHERE a.subscription_id = p_subscription_id;
        IF (v_sub.max_agents IS NULL OR v_assigned < v_sub.max_agents)
           AND (p_cooldown_window IS NULL OR (
                v_sub.enabled AND NOT EXISTS (
                    SELECT 1 FROM switcher.failures f
                    WHERE f.subscription_id = p_subscription_id
                      AND f.occurred_at > now() - p_cooldown_window)))
        THEN
            RETURN 'reserved';
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'SW001';
    EXCEPTION WHEN SQLSTATE 'SW001' THEN
        RETURN 'full';
    END;
END
$$


-- upgrade: function move_agent
CREATE FUNCTION switcher.move_agent(
    p_agent_id bigint, p_from_id bigint, p_to_id bigint, p_kind text, p_reason text,
    OUT agent_generation bigint, OUT restart_id bigint)
LANGUAGE plpgsql AS $$
-- Reassign an agent whose row the caller has locked, log the switch, enqueue its restart.
DECLARE
    v_payload jsonb;
BEGIN
    UPDATE switcher.agents a
    SET subscription_id = p_to_id, generation = a.generation + 1, updated_at = now()
    WHERE a.id = p_agent_id
    RETURNING a.generation,
              jsonb_build_object(
                  'agent', a.name,
                  'container', a.container,
                  'subscription', (SELECT s.name FROM switcher.subscriptions s WHERE s.id = p_to_id))
    INTO agent_generation, v_payload;
    INSERT INTO switcher.switches
        (agent_id, from_subscription_id, to_subscription_id, kind, generation, reason)
    VALUES (p_agent_id, p_from_id, p_to_id, p_kind, agent_generation, p_reason);
    restart_id := switcher.enqueue('restart_agent', p_agent_id, agent_generation, v_payload);
END
$$


-- upgrade: function handle_failure
CREATE FUNCTION switcher.handle_failure(
    p_agent text, p_snapshot text, p_kind text, p_message text, p_lock_timeout text,
    p_order text DEFAULT 'least_loaded', p_ranked text[] DEFAULT NULL,
    OUT outcome text, OUT old_subscription text, OUT new_subscription text,
    OUT agent_generation bigint, OUT restart_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_previous_lock_timeout text := current_setting('lock_timeout');
    v_agent record;
    v_snapshot_id bigint;
    v_locked record;
    v_auto_switch boolean;
    v_window interval;
    v_candidate record;
    v_target_id bigint;
    v_target_name text;
    v_reservation text;
    v_busy bigint[] := '{}';
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    <<decide>>
    BEGIN
        SELECT a.id, a.subscription_id, a.generation, s.name AS subscription INTO v_agent
        FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
        WHERE a.name = p_agent;
        IF NOT FOUND THEN
            outcome := 'unknown_agent';
            EXIT decide;
        END IF;
        old_subscription := v_agent.subscription;
        new_subscription := v_agent.subscription;
        agent_generation := v_agent.generation;
        IF p_snapshot IS NULL THEN
            v_snapshot_id := v_agent.subscription_id;
        ELSE
            SELECT s.id INTO v_snapshot_id FROM switcher.subscriptions s WHERE s.name = p_snapshot;
            IF NOT FOUND THEN
                outcome := 'unknown_subscription';
                EXIT decide;
            END IF;
        END IF;
        IF v_agent.subscription_id IS NULL THEN
            outcome := 'not_subscription_backed';
            EXIT decide;
        END IF;
        IF v_agent.subscription_id <> v_snapshot_id THEN
            outcome := 'stale';  -- visibly stale: someone already moved the agent; no wait, no write
            EXIT decide;
        END IF;

        -- The lock and the stale guard at once: once the lock is free, Postgres re-checks the
        -- condition on the newest row version, so reports queued behind a winning switch find no row.
        SELECT a.generation INTO v_locked
        FROM switcher.agents a
        WHERE a.id = v_agent.id AND a.subscription_id = v_snapshot_id
        FOR UPDATE;
        IF NOT FOUND THEN
            SELECT a.subscription_id, a.generation, s.name AS subscription INTO v_agent
            FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
            WHERE a.id = v_agent.id;
            IF NOT FOUND THEN
                outcome := 'unknown_agent';
            ELSIF v_agent.subscription_id IS NULL THEN
                outcome := 'not_subscription_backed';
            ELSE
                outcome := 'stale';
            END IF;
            old_subscription := v_agent.subscription;
            new_subscription := v_agent.subscription;
            agent_generation := v_agent.generation;
            EXIT decide;
        END IF;

        -- Always recorded, auto-switch on or off: it is what puts the subscription into cooldown.
        INSERT INTO switcher.failures (agent_id, subscription_id, kind, message)
        VALUES (v_agent.id, v_snapshot_id, p_kind, p_message);

        SELECT st.auto_switch, st.cooldown_window INTO v_auto_switch, v_window
        FROM switcher.settings st WHERE st.id = 1;
        IF NOT COALESCE(v_auto_switch, true) THEN
            outcome := 'disabled';
            EXIT decide;
        END IF;
        v_window := COALESCE(v_window, interval '2 hours');

        -- Unlimited candidates need no lock. Capacity-limited ones are locked one at a time: first
        -- skipping those another switch holds, then waiting for them only if nothing else had room.
        FOR v_candidate IN
            SELECT c.id, c.name, c.max_agents
            FROM switcher.candidates(v_snapshot_id, v_window) c
            WHERE p_ranked IS NULL OR c.name = ANY (p_ranked)
            ORDER BY array_position(p_ranked, c.name),
                     CASE WHEN p_order = 'by_priority' THEN c.priority END,
                     c.assigned, c.priority, c.id
        LOOP
            IF v_candidate.max_agents IS NULL THEN
                v_reservation := 'reserved';
            ELSE
                v_reservation := switcher.reserve(v_candidate.id, v_window, false);
            END IF;
            IF v_reservation = 'reserved' THEN
                v_target_id := v_candidate.id;
                v_target_name := v_candidate.name;
                EXIT;
            ELSIF v_reservation = 'busy' THEN
                v_busy := v_busy || v_candidate.id;
            END IF;
        END LOOP;
        IF v_target_id IS NULL THEN
            FOR v_candidate IN
                SELECT s.id, s.name FROM unnest(v_busy) WITH ORDINALITY AS b(id, n)
                JOIN switcher.subscriptions s ON s.id = b.id ORDER BY b.n
            LOOP
                IF switcher.reserve(v_candidate.id, v_window, true) = 'reserved' THEN
                    v_target_id := v_candidate.id;
                    v_target_name := v_candidate.name;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        IF v_target_id IS NULL THEN
            outcome := 'no_alternative';
            EXIT decide;
        END IF;

        SELECT m.agent_generation, m.restart_id INTO agent_generation, restart_id
        FROM switcher.move_agent(v_agent.id, v_snapshot_id, v_target_id, p_kind, p_message) m;
        outcome := 'switched';
        new_subscription := v_target_name;
    END decide;
    PERFORM set_config('lock_timeout', v_previous_lock_timeout, true);
END
$$


-- upgrade: function assign
CREATE FUNCTION switcher.assign(
    p_agent text, p_subscription text, p_lock_timeout text,
    OUT outcome text, OUT old_subscription text, OUT new_subscription text,
    OUT agent_generation bigint, OUT restart_id bigint)
LANGUAGE plpgsql AS $$
-- A manual assignment: same lock order as handle_failure (agent row, then the subscription row if it
-- has max_agents); ignores cooldown and enabled, respects capacity.
DECLARE
    v_agent record;
    v_target record;
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    SELECT a.id, a.subscription_id, a.generation, s.name AS subscription INTO v_agent
    FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
    WHERE a.name = p_agent
    FOR UPDATE OF a;
    IF NOT FOUND THEN
        outcome := 'unknown_agent';
        RETURN;
    END IF;
    old_subscription := v_agent.subscription;
    new_subscription := v_agent.subscription;
    agent_generation := v_agent.generation;
    SELECT s.id, s.name, s.max_agents INTO v_target
    FROM switcher.subscriptions s WHERE s.name = p_subscription;
    IF NOT FOUND THEN
        outcome := 'unknown_subscription';
    ELSIF v_target.id = v_agent.subscription_id THEN
        outcome := 'unchanged';
    ELSIF v_target.max_agents IS NOT NULL AND switcher.reserve(v_target.id, NULL, true) <> 'reserved' THEN
        outcome := 'full';
    ELSE
        SELECT m.agent_generation, m.restart_id INTO agent_generation, restart_id
        FROM switcher.move_agent(
            v_agent.id, v_agent.subscription_id, v_target.id, NULL, 'manual assignment') m;
        outcome := 'switched';
        new_subscription := v_target.name;
    END IF;
END
$$
