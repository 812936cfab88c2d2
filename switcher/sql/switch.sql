-- The switch: move an agent off a failing subscription, once, in one transaction.
--
-- It runs in the database, next to the rows it locks: one round trip per report, the same code for every
-- client, and no row lock held across a network hop to an application. switcher/switch.py calls it.
--
-- What one report does (READ COMMITTED):
--   1. An unlocked read resolves the names and finds the report's earlier answer, if an earlier attempt
--      committed one (report ids make a retry return the original answer, never a second switch). If the
--      agent has visibly left the reported subscription (or generation), the answer is 'stale' at once:
--      no lock, no write.
--   2. SELECT ... FOR UPDATE of the agent row on condition that it still uses the reported subscription:
--      the stale guard, which PostgreSQL re-checks on the newest row version once the lock is free, so
--      reports queued behind a winning switch all answer 'stale' together instead of taking the lock in
--      turn.
--   3. Under the lock, the eligible alternatives (eligible_v2) are tried in the policy's order; a
--      capacity-limited one is reserved under its row lock (reserve_v2).
--   4. The agent is moved (move_agent_v2): generation bumped, switch logged, restart enqueued in the
--      outbox with NOTIFY, and a switch notification when a webhook is set. The failure is recorded with
--      the answer, always (auto-switch on or off): it is what puts the subscription into cooldown.
--      All of it commits together or not at all.
--
-- Lock order (the only locks taken, always in this order, so switches cannot deadlock each other):
--   1. the agent's row, FOR UPDATE -- serializes every switch and assignment of that agent;
--   2. at most one capacity-limited subscription row at a time, FOR NO KEY UPDATE (failures can still be
--      recorded against it). A candidate found full is released at once; candidates another switch
--      holds are skipped at first and waited for only if no other has room, so a herd spreads;
--   3. the two load-shard rows of the move (track_load_v2), in subscription id order.
-- Switches of different agents onto unlimited subscriptions share no lock except, rarely, a load shard.
--
-- Every function pins search_path and names every object with its schema, so no object a less
-- privileged role creates elsewhere (a function or operator in public) is ever called.
--
-- The functions a caller enters (here, in outbox.sql and in executions.sql) also set enable_seqscan = off:
-- every lookup they make has an index, and a session keeps the plans it made while failures and the
-- outbox were nearly empty until the next ANALYZE, so a scan planned then would read the whole history
-- on every call as it grows (db/versions/0003_index_probes.sql; tests/test_scale.py). And jit = off:
-- PostgreSQL 15-17 cost a scan that stays (subscriptions) at 1e10, which would JIT-compile it on every
-- call, 100 ms per switch (db/versions/0004_no_jit.sql).


-- function: eligible_v2
CREATE FUNCTION switcher.eligible_v2(p_exclude bigint, p_window interval, p_only bigint DEFAULT NULL)
RETURNS TABLE (id bigint, name text, priority integer, max_agents integer, load bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET jit = off
AS $$
-- The one eligibility rule. A subscription is a candidate when it is not p_exclude, has room under
-- max_agents and -- unless p_window is NULL (a manual assignment) -- is enabled with no failure inside
-- the cooldown window. Its load is the sum of its load shards: a few rows, whatever the fleet's size.
BEGIN
    RETURN QUERY
    SELECT s.id, s.name, s.priority, s.max_agents, l.load
    FROM switcher.subscriptions s
    CROSS JOIN LATERAL (
        SELECT COALESCE(sum(x.agents), 0)::bigint AS load
        FROM switcher.subscription_load x
        WHERE x.subscription_id = s.id
    ) l
    WHERE (p_only IS NULL OR s.id = p_only)
      AND s.id IS DISTINCT FROM p_exclude
      AND (s.max_agents IS NULL OR l.load < s.max_agents)
      AND (p_window IS NULL OR (s.enabled AND NOT EXISTS (
          SELECT FROM switcher.failures f
          WHERE f.subscription_id = s.id AND f.occurred_at > now() - p_window)));
END
$$;


-- function: track_load_v2
CREATE FUNCTION switcher.track_load_v2()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
-- Keeps subscription_load in step with agents.subscription_id, whoever writes it. An agent counts on
-- shard (its id modulo TG_ARGV[0]) of its subscription, so moves of different agents update different
-- rows instead of queueing on one counter. The two rows of a move are updated in subscription id order,
-- so moves in opposite directions cannot deadlock. A capacity-limited subscription's sum is exact under
-- its row lock (reserve_v2): every move onto it holds that lock.
DECLARE
    v_shard integer := COALESCE(NEW.id, OLD.id) % TG_ARGV[0]::integer;
    v_from bigint;
    v_to bigint;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        v_from := OLD.subscription_id;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        v_to := NEW.subscription_id;
    END IF;
    IF v_from IS NOT NULL AND (v_to IS NULL OR v_from < v_to) THEN
        UPDATE switcher.subscription_load l SET agents = l.agents - 1
        WHERE l.subscription_id = v_from AND l.shard = v_shard;
        v_from := NULL;
    END IF;
    IF v_to IS NOT NULL THEN
        UPDATE switcher.subscription_load l SET agents = l.agents + 1
        WHERE l.subscription_id = v_to AND l.shard = v_shard;
    END IF;
    IF v_from IS NOT NULL THEN
        UPDATE switcher.subscription_load l SET agents = l.agents - 1
        WHERE l.subscription_id = v_from AND l.shard = v_shard;
    END IF;
    RETURN NULL;
END
$$;


-- function: add_load_shards_v2
CREATE FUNCTION switcher.add_load_shards_v2()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
-- A new subscription starts with TG_ARGV[0] empty load shards.
BEGIN
    INSERT INTO switcher.subscription_load (subscription_id, shard)
    SELECT NEW.id, g FROM pg_catalog.generate_series(0, TG_ARGV[0]::integer - 1) AS g;
    RETURN NULL;
END
$$;


-- function: reserve_v2
CREATE FUNCTION switcher.reserve_v2(
    p_subscription_id bigint, p_exclude bigint, p_window interval, p_wait boolean)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
-- Lock a capacity-limited subscription's row (FOR NO KEY UPDATE: failures can still be recorded against
-- it) and check that it is still a candidate. 'reserved': the lock is kept until commit. 'full': it no
-- longer qualifies, and the lock is released again (this block's subtransaction is rolled back).
-- 'busy': p_wait is false and another switch holds the row.
BEGIN
    BEGIN
        IF p_wait THEN
            PERFORM FROM switcher.subscriptions s WHERE s.id = p_subscription_id FOR NO KEY UPDATE;
        ELSE
            PERFORM FROM switcher.subscriptions s WHERE s.id = p_subscription_id
            FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        IF NOT FOUND THEN
            RETURN CASE WHEN p_wait THEN 'full' ELSE 'busy' END;
        END IF;
        -- A new statement: it sees what the lock's previous holder committed.
        PERFORM FROM switcher.eligible_v2(p_exclude, p_window, p_subscription_id);
        IF FOUND THEN
            RETURN 'reserved';
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'SW001';
    EXCEPTION WHEN SQLSTATE 'SW001' THEN
        RETURN 'full';
    END;
END
$$;


-- function: move_agent_v2
CREATE FUNCTION switcher.move_agent_v2(
    p_agent_id bigint, p_from_id bigint, p_from_name text, p_to_id bigint, p_to_name text,
    p_kind text, p_reason text, p_notify boolean, p_channel text, p_restart_kind text, p_notify_kind text,
    OUT agent_generation bigint, OUT restart_id bigint, OUT wake boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
-- Reassign an agent whose row the caller has locked: log the switch, enqueue its restart (which applies
-- whatever the agent's assignment is when it runs) and, with p_notify, one notification of this switch;
-- then move the agent and bump its generation. The move comes last: it takes the two load shards'
-- rows (track_load_v2), and they are held until commit, so the less comes after it the better.
-- Payloads hold names only, never a credential or its reference. wake: drainers need waking (see
-- enqueue_v2; with p_channel NULL the caller does it after the commit).
DECLARE
    v_agent record;
    v_switch record;
BEGIN
    SELECT a.name, a.container, a.generation + 1 AS generation INTO v_agent
    FROM switcher.agents a WHERE a.id = p_agent_id;
    agent_generation := v_agent.generation;
    INSERT INTO switcher.switches
        (agent_id, from_subscription_id, to_subscription_id, kind, generation, reason)
    VALUES (p_agent_id, p_from_id, p_to_id, p_kind, agent_generation, p_reason)
    RETURNING switches.id, switches.switched_at INTO v_switch;
    SELECT e.message_id, e.wake INTO restart_id, wake
    FROM switcher.enqueue_v2(
        p_restart_kind, p_agent_id, agent_generation,
        jsonb_build_object('agent', v_agent.name, 'container', v_agent.container, 'subscription', p_to_name),
        p_channel) e;
    IF p_notify THEN  -- an event: always new, always a wake-up
        PERFORM switcher.enqueue_v2(
            p_notify_kind, NULL, agent_generation,
            jsonb_build_object(
                'switch_id', v_switch.id, 'agent', v_agent.name, 'from', p_from_name, 'to', p_to_name,
                'kind', p_kind, 'generation', agent_generation, 'switched_at', v_switch.switched_at),
            p_channel);
        wake := true;
    END IF;
    UPDATE switcher.agents a
    SET subscription_id = p_to_id, generation = agent_generation, updated_at = now()
    WHERE a.id = p_agent_id;
END
$$;


-- function: report_answer_v2
CREATE FUNCTION switcher.report_answer_v2(
    p_report_id text, p_agent_id bigint,
    OUT outcome text, OUT old_subscription text, OUT new_subscription text,
    OUT agent_generation bigint, OUT restart_id bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
-- The answer recorded for a report, for a retry of it. 'report_id_reused': another agent's report had
-- that id.
BEGIN
    SELECT CASE WHEN f.agent_id = p_agent_id THEN f.outcome ELSE 'report_id_reused' END,
           o.name, COALESCE(n.name, o.name), f.generation, f.restart_id
    INTO outcome, old_subscription, new_subscription, agent_generation, restart_id
    FROM switcher.failures f
    JOIN switcher.subscriptions o ON o.id = f.subscription_id
    LEFT JOIN switcher.subscriptions n ON n.id = f.new_subscription_id
    WHERE f.report_id = p_report_id;
END
$$;


-- function: handle_failure_v2
CREATE FUNCTION switcher.handle_failure_v2(
    p_report_id text, p_agent text, p_snapshot text, p_generation bigint, p_kind text, p_message text,
    p_lock_timeout text, p_priority_first boolean, p_ranked text[],
    p_channel text, p_restart_kind text, p_notify_kind text,
    OUT outcome text, OUT old_subscription text, OUT new_subscription text,
    OUT agent_generation bigint, OUT restart_id bigint, OUT replayed boolean, OUT wake boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET jit = off
AS $$
-- One report (see the top of this file). p_snapshot NULL: whatever the agent uses now. p_generation:
-- the agent's generation the failed request ran under, when the caller knows it (a stricter guard).
-- p_ranked: a Python policy's ranking of the candidates' names (NULL: the built-in order, least loaded
-- first, or lowest priority value first with p_priority_first). p_channel NULL: drainers are woken by the
-- caller, after the commit, when wake says so (see enqueue_v2).
DECLARE
    v_lock_timeout text := current_setting('lock_timeout');
    v_agent record;
    v_snapshot_id bigint;
    v_settings record;
    v_candidate record;
    v_target_id bigint;
    v_target_name text;
    v_busy bigint[] := '{}';
    v_busy_names text[] := '{}';
    v_next integer;
BEGIN
    replayed := false;
    wake := false;
    IF v_lock_timeout <> p_lock_timeout THEN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
    END IF;
    <<decide>>
    BEGIN
        SELECT a.id, a.subscription_id, a.generation, cur.name AS subscription, snap.id AS snapshot_id,
               r.id IS NOT NULL AS answered
        INTO v_agent
        FROM switcher.agents a
        LEFT JOIN switcher.subscriptions cur ON cur.id = a.subscription_id
        LEFT JOIN switcher.subscriptions snap ON snap.name = p_snapshot
        LEFT JOIN switcher.failures r ON r.report_id = p_report_id
        WHERE a.name = p_agent;
        IF NOT FOUND THEN
            outcome := 'unknown_agent';
            EXIT decide;
        END IF;
        IF v_agent.answered THEN
            SELECT * INTO outcome, old_subscription, new_subscription, agent_generation, restart_id
            FROM switcher.report_answer_v2(p_report_id, v_agent.id);
            replayed := true;
            EXIT decide;
        END IF;
        old_subscription := v_agent.subscription;
        new_subscription := v_agent.subscription;
        agent_generation := v_agent.generation;
        IF p_snapshot IS NOT NULL AND v_agent.snapshot_id IS NULL THEN
            outcome := 'unknown_subscription';
            EXIT decide;
        END IF;
        IF v_agent.subscription_id IS NULL THEN
            outcome := 'not_subscription_backed';
            EXIT decide;
        END IF;
        v_snapshot_id := COALESCE(v_agent.snapshot_id, v_agent.subscription_id);
        IF v_agent.subscription_id <> v_snapshot_id OR v_agent.generation <> p_generation THEN
            outcome := 'stale';  -- visibly stale: the agent already moved on; no wait, no write
            EXIT decide;
        END IF;

        -- The lock and the stale guard at once: once the lock is free, PostgreSQL re-checks the condition
        -- on the newest row version, so reports queued behind a winning switch find no row.
        PERFORM FROM switcher.agents a
        WHERE a.id = v_agent.id AND a.subscription_id = v_snapshot_id
          AND (p_generation IS NULL OR a.generation = p_generation)
        FOR UPDATE;
        IF NOT FOUND THEN
            SELECT a.id, a.subscription_id, a.generation, s.name AS subscription,
                   EXISTS (SELECT FROM switcher.failures f WHERE f.report_id = p_report_id) AS answered
            INTO v_agent  -- a new row type for the record: every field used below is selected here
            FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
            WHERE a.id = v_agent.id;
            IF NOT FOUND THEN
                outcome := 'unknown_agent';
            ELSIF v_agent.answered THEN  -- an earlier attempt of this report moved it
                SELECT * INTO outcome, old_subscription, new_subscription, agent_generation, restart_id
                FROM switcher.report_answer_v2(p_report_id, v_agent.id);
                replayed := true;
            ELSE
                outcome := CASE WHEN v_agent.subscription_id IS NULL THEN 'not_subscription_backed'
                                ELSE 'stale' END;
                old_subscription := v_agent.subscription;
                new_subscription := v_agent.subscription;
                agent_generation := v_agent.generation;
            END IF;
            EXIT decide;
        END IF;

        -- A new statement after the lock: it also sees an earlier attempt of this report that committed
        -- while this one waited (and left the agent where it was).
        SELECT st.auto_switch, st.cooldown_window, st.webhook IS NOT NULL AS notify,
               EXISTS (SELECT FROM switcher.failures f WHERE f.report_id = p_report_id) AS answered
        INTO v_settings
        FROM switcher.settings st WHERE st.id = 1;
        IF v_settings.answered THEN
            SELECT * INTO outcome, old_subscription, new_subscription, agent_generation, restart_id
            FROM switcher.report_answer_v2(p_report_id, v_agent.id);
            replayed := true;
            EXIT decide;
        END IF;

        IF v_settings.auto_switch THEN
            -- Unlimited candidates need no lock. Capacity-limited ones are reserved one at a time: first
            -- skipping those another switch holds, then waiting for them only if nothing else had room.
            FOR v_candidate IN
                SELECT e.id, e.name, e.max_agents
                FROM switcher.eligible_v2(v_snapshot_id, v_settings.cooldown_window) e
                WHERE p_ranked IS NULL OR e.name = ANY (p_ranked)
                ORDER BY array_position(p_ranked, e.name),
                         CASE WHEN p_priority_first THEN e.priority END,
                         e.load, e.priority, e.id
            LOOP
                IF v_candidate.max_agents IS NULL THEN
                    v_target_id := v_candidate.id;
                    v_target_name := v_candidate.name;
                    EXIT;
                END IF;
                CASE switcher.reserve_v2(v_candidate.id, v_snapshot_id, v_settings.cooldown_window, false)
                    WHEN 'reserved' THEN
                        v_target_id := v_candidate.id;
                        v_target_name := v_candidate.name;
                        EXIT;
                    WHEN 'busy' THEN
                        v_busy := v_busy || v_candidate.id;
                        v_busy_names := v_busy_names || v_candidate.name;
                    ELSE
                        NULL;
                END CASE;
            END LOOP;
            -- Waiters start at different busy candidates (by agent id), so that a herd waits on all of them
            -- instead of queueing on the first while the others sit idle.
            FOR i IN 0 .. cardinality(v_busy) - 1 LOOP
                EXIT WHEN v_target_id IS NOT NULL;
                v_next := 1 + (v_agent.id + i) % cardinality(v_busy);
                IF switcher.reserve_v2(v_busy[v_next], v_snapshot_id, v_settings.cooldown_window, true)
                   = 'reserved' THEN
                    v_target_id := v_busy[v_next];
                    v_target_name := v_busy_names[v_next];
                END IF;
            END LOOP;
        END IF;

        IF v_target_id IS NULL THEN
            outcome := CASE WHEN v_settings.auto_switch THEN 'no_alternative' ELSE 'disabled' END;
        ELSE
            SELECT m.agent_generation, m.restart_id, m.wake INTO agent_generation, restart_id, wake
            FROM switcher.move_agent_v2(
                v_agent.id, v_snapshot_id, v_agent.subscription, v_target_id, v_target_name,
                p_kind, p_message, v_settings.notify, p_channel, p_restart_kind, p_notify_kind) m;
            outcome := 'switched';
            new_subscription := v_target_name;
        END IF;
        INSERT INTO switcher.failures
            (report_id, agent_id, subscription_id, kind, message, outcome, new_subscription_id,
             generation, restart_id)
        VALUES (p_report_id, v_agent.id, v_snapshot_id, p_kind, p_message, outcome, v_target_id,
                agent_generation, restart_id);
    END decide;
    IF v_lock_timeout <> p_lock_timeout THEN
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
    END IF;
END
$$;


-- function: assign_v2
CREATE FUNCTION switcher.assign_v2(
    p_agent text, p_subscription text, p_lock_timeout text,
    p_channel text, p_restart_kind text, p_notify_kind text,
    OUT outcome text, OUT old_subscription text, OUT new_subscription text,
    OUT agent_generation bigint, OUT restart_id bigint, OUT wake boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET jit = off
AS $$
-- A manual assignment: the same lock order as a switch (the agent row, then the subscription row if it
-- has max_agents); ignores cooldown and enabled, respects capacity.
DECLARE
    v_lock_timeout text := current_setting('lock_timeout');
    v_agent record;
    v_target record;
    v_notify boolean;
BEGIN
    IF v_lock_timeout <> p_lock_timeout THEN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
    END IF;
    SELECT a.id, a.subscription_id, a.generation, s.name AS subscription INTO v_agent
    FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
    WHERE a.name = p_agent
    FOR UPDATE OF a;
    IF NOT FOUND THEN
        outcome := 'unknown_agent';
    ELSE
        old_subscription := v_agent.subscription;
        new_subscription := v_agent.subscription;
        agent_generation := v_agent.generation;
        SELECT s.id, s.name, s.max_agents INTO v_target
        FROM switcher.subscriptions s WHERE s.name = p_subscription;
        IF NOT FOUND THEN
            outcome := 'unknown_subscription';
        ELSIF v_target.id = v_agent.subscription_id THEN
            outcome := 'unchanged';
        ELSIF v_target.max_agents IS NOT NULL
              AND switcher.reserve_v2(v_target.id, NULL, NULL, true) <> 'reserved' THEN
            outcome := 'full';
        ELSE
            SELECT st.webhook IS NOT NULL INTO v_notify FROM switcher.settings st WHERE st.id = 1;
            SELECT m.agent_generation, m.restart_id, m.wake INTO agent_generation, restart_id, wake
            FROM switcher.move_agent_v2(
                v_agent.id, v_agent.subscription_id, v_agent.subscription, v_target.id, v_target.name,
                NULL, 'manual assignment', v_notify, p_channel, p_restart_kind, p_notify_kind) m;
            outcome := 'switched';
            new_subscription := v_target.name;
        END IF;
    END IF;
    IF v_lock_timeout <> p_lock_timeout THEN
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
    END IF;
END
$$;


-- name: handle_failure
SELECT outcome, old_subscription, new_subscription, agent_generation, restart_id, replayed, wake
FROM switcher.handle_failure_v2(
    :report_id, :agent, :snapshot, :generation, :kind, :message, :lock_timeout, :priority_first,
    CAST(:ranked AS text[]), :channel, :restart_kind, :notify_kind)

-- name: assign
SELECT outcome, old_subscription, new_subscription, agent_generation, restart_id, wake
FROM switcher.assign_v2(:agent, :subscription, :lock_timeout, :channel, :restart_kind, :notify_kind)

-- name: candidates
-- For a policy written in Python: the candidates it ranks (the agent's current subscription excluded
-- when the report names none).
SELECT e.id, e.name, e.priority, e.max_agents, e.load
FROM switcher.agents a
CROSS JOIN switcher.settings st
CROSS JOIN LATERAL switcher.eligible_v2(
    COALESCE((SELECT s.id FROM switcher.subscriptions s WHERE s.name = :snapshot), a.subscription_id),
    st.cooldown_window) e
WHERE a.name = :agent AND st.id = 1
