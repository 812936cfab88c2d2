-- 0002: report ids, load shards, delivery state, executions, placement, notifications, retention, drainers;
-- every function versioned (_v2), with a pinned search_path.
--
-- The unversioned functions of 0001 are dropped: stop processes running switcher 0.1 before this
-- migration. From here on a changed function gets a new name in a new migration, next to the old one, so
-- old and new code run side by side during a deploy; the old name goes one release later.
--
-- Frozen: the function blocks below are copies of the head files (switcher/sql/*.sql) as of this
-- revision. tests/test_migrations.py proves the migrated database matches the head files.


-- upgrade: drop the unversioned functions of 0001
DROP FUNCTION switcher.assign(text, text, text),
              switcher.handle_failure(text, text, text, text, text, text, text[]),
              switcher.move_agent(bigint, bigint, bigint, text, text),
              switcher.reserve(bigint, interval, boolean),
              switcher.candidates(bigint, interval),
              switcher.enqueue(text, bigint, bigint, jsonb)

-- upgrade: agents are placed on a Docker host (NULL: the drainers without --placement); a switch moves
-- an agent without touching an index (a HOT update), given room on its page
ALTER TABLE switcher.agents ADD COLUMN placement text, SET (fillfactor = 80)

-- upgrade: load is counted by subscription_load now; deleting a subscription (refused while it has
-- agents) scans agents instead, which is rare, small, and cheaper than an index every switch updates
DROP INDEX switcher.agents_subscription_id_idx

-- upgrade: fewer indexes for every report to write: removing an agent (rare; its history is bounded by
-- retention) scans failures and switches instead
DROP INDEX switcher.failures_agent_id_idx

-- upgrade: fewer indexes for every report to write (see above)
DROP INDEX switcher.switches_agent_id_idx

-- upgrade: claims take pending messages oldest first by id; a refreshed pending message (a new switch of
-- its agent) then changes no indexed column and is updated in place (HOT), given room on its page
DROP INDEX switcher.outbox_due_idx

-- upgrade: (see above)
CREATE INDEX outbox_pending_idx ON switcher.outbox (id) WHERE status = 'pending'

-- upgrade: (see above)
ALTER TABLE switcher.outbox SET (fillfactor = 70)

-- upgrade: every claim of a message is a new lease with its own number, the fencing token its holder's
-- writes must match: a holder whose lease ran out can change nothing, even if it claims the message again
ALTER TABLE switcher.outbox ADD COLUMN lease_no integer NOT NULL DEFAULT 0

-- upgrade: a failure remembers its report and the answer it got, so a retry gets the same answer
ALTER TABLE switcher.failures
    ADD COLUMN report_id text,
    ADD COLUMN outcome text,
    ADD COLUMN new_subscription_id bigint,
    ADD COLUMN generation bigint,
    ADD COLUMN restart_id bigint,
    ADD CONSTRAINT failures_new_subscription_id_fkey FOREIGN KEY (new_subscription_id)
        REFERENCES switcher.subscriptions (id) ON DELETE SET NULL,
    ADD CONSTRAINT failures_outcome_check
        CHECK (outcome IN ('switched', 'no_alternative', 'disabled'))

-- upgrade: failures recorded before report ids get one of their own
UPDATE switcher.failures SET report_id = 'before-0002-' || id

-- upgrade: report ids are required and unique
ALTER TABLE switcher.failures ALTER COLUMN report_id SET NOT NULL,
    ADD CONSTRAINT failures_report_id_key UNIQUE (report_id)

-- upgrade: events (notifications) belong to no agent's queue
ALTER TABLE switcher.outbox ALTER COLUMN agent_id DROP NOT NULL

-- upgrade: operators can cancel a pending message
ALTER TABLE switcher.outbox DROP CONSTRAINT outbox_status_check,
    ADD CONSTRAINT outbox_status_check
        CHECK (status IN ('pending', 'running', 'done', 'dead', 'superseded', 'cancelled'))

-- upgrade: webhook (a credential reference) and retention of history
ALTER TABLE switcher.settings
    ADD COLUMN webhook text,
    ADD COLUMN retention interval NOT NULL DEFAULT '30 days',
    ADD CONSTRAINT settings_retention_check CHECK (retention > interval '0')

-- upgrade: load per subscription, sharded over 32 rows so that concurrent moves seldom meet on one
CREATE TABLE switcher.subscription_load (
    subscription_id bigint NOT NULL,
    shard smallint NOT NULL,
    agents integer NOT NULL DEFAULT 0,
    CONSTRAINT subscription_load_pkey PRIMARY KEY (subscription_id, shard),
    CONSTRAINT subscription_load_subscription_id_fkey FOREIGN KEY (subscription_id)
        REFERENCES switcher.subscriptions (id) ON DELETE CASCADE
) WITH (fillfactor = 50)

-- upgrade: the load of every existing subscription
INSERT INTO switcher.subscription_load (subscription_id, shard, agents)
SELECT s.id, g.shard, (SELECT count(*) FROM switcher.agents a
                       WHERE a.subscription_id = s.id AND a.id % 32 = g.shard)
FROM switcher.subscriptions s CROSS JOIN generate_series(0, 31) AS g(shard)

-- upgrade: what a delivery to an agent left behind
CREATE TABLE switcher.deliveries (
    agent_id bigint NOT NULL,
    intended_running boolean,
    applied_generation bigint,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT deliveries_pkey PRIMARY KEY (agent_id),
    CONSTRAINT deliveries_agent_id_fkey FOREIGN KEY (agent_id)
        REFERENCES switcher.agents (id) ON DELETE CASCADE
)

-- upgrade: in-flight executions of agents, which drain-aware restarts wait for
CREATE TABLE switcher.executions (
    id bigint GENERATED BY DEFAULT AS IDENTITY,
    agent_id bigint NOT NULL,
    generation bigint NOT NULL,
    holder text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    CONSTRAINT executions_pkey PRIMARY KEY (id),
    CONSTRAINT executions_agent_id_fkey FOREIGN KEY (agent_id)
        REFERENCES switcher.agents (id) ON DELETE CASCADE
)

-- upgrade: live executions of an agent
CREATE INDEX executions_agent_id_idx ON switcher.executions (agent_id, expires_at)

-- upgrade: drainers say when they were last seen (switcher check)
CREATE TABLE switcher.drainers (
    worker_id text NOT NULL,
    placement text,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz,
    CONSTRAINT drainers_pkey PRIMARY KEY (worker_id)
)


-- upgrade: function eligible_v2
CREATE FUNCTION switcher.eligible_v2(p_exclude bigint, p_window interval, p_only bigint DEFAULT NULL)
RETURNS TABLE (id bigint, name text, priority integer, max_agents integer, load bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
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
$$


-- upgrade: function track_load_v2
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
$$


-- upgrade: function add_load_shards_v2
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
$$


-- upgrade: function reserve_v2
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
$$


-- upgrade: function move_agent_v2
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
$$


-- upgrade: function report_answer_v2
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
$$


-- upgrade: function handle_failure_v2
CREATE FUNCTION switcher.handle_failure_v2(
    p_report_id text, p_agent text, p_snapshot text, p_generation bigint, p_kind text, p_message text,
    p_lock_timeout text, p_priority_first boolean, p_ranked text[],
    p_channel text, p_restart_kind text, p_notify_kind text,
    OUT outcome text, OUT old_subscription text, OUT new_subscription text,
    OUT agent_generation bigint, OUT restart_id bigint, OUT replayed boolean, OUT wake boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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
$$


-- upgrade: function assign_v2
CREATE FUNCTION switcher.assign_v2(
    p_agent text, p_subscription text, p_lock_timeout text,
    p_channel text, p_restart_kind text, p_notify_kind text,
    OUT outcome text, OUT old_subscription text, OUT new_subscription text,
    OUT agent_generation bigint, OUT restart_id bigint, OUT wake boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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
$$


-- upgrade: function enter_execution_v2
CREATE FUNCTION switcher.enter_execution_v2(
    p_agent text, p_holder text, p_ttl interval, p_gate_timeout interval, p_gate_class integer,
    p_restart_kind text,
    OUT execution_id bigint, OUT subscription text, OUT agent_generation bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
-- Register an execution once no restart of the agent is pending or running and its gate is open; the
-- snapshot is read in the same statement that registers it. Raises lock_not_available after
-- p_gate_timeout; SW002 when a restart was enqueued while it registered (the caller tries again).
-- No row: unknown agent.
DECLARE
    v_agent_id bigint;
    v_lock_timeout text := current_setting('lock_timeout');
    v_deadline timestamptz := clock_timestamp() + p_gate_timeout;
    v_pause float8 := 0.005;
BEGIN
    SELECT a.id INTO v_agent_id FROM switcher.agents a WHERE a.name = p_agent;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Holding nothing while it waits: each check is a new statement, which sees what has committed.
    WHILE EXISTS (SELECT FROM switcher.outbox o
                  WHERE o.agent_id = v_agent_id AND o.kind = p_restart_kind
                    AND o.status IN ('pending', 'running')) LOOP
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'agent % is restarting', p_agent USING ERRCODE = 'lock_not_available';
        END IF;
        PERFORM pg_sleep(v_pause);
        v_pause := least(v_pause * 2, 0.1);
    END LOOP;
    PERFORM set_config('lock_timeout',
        greatest(1, ceil(extract(epoch FROM v_deadline - clock_timestamp()) * 1000))::bigint || 'ms', true);
    PERFORM pg_advisory_xact_lock_shared(p_gate_class, (v_agent_id % 2147483648)::integer);
    PERFORM set_config('lock_timeout', v_lock_timeout, true);
    WITH snapshot AS (
        SELECT a.id, a.generation, s.name
        FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
        WHERE a.id = v_agent_id
          AND NOT EXISTS (SELECT FROM switcher.outbox o
                          WHERE o.agent_id = a.id AND o.kind = p_restart_kind
                            AND o.status IN ('pending', 'running'))
    ), registered AS (
        INSERT INTO switcher.executions (agent_id, generation, holder, expires_at)
        SELECT snapshot.id, snapshot.generation, p_holder, now() + p_ttl FROM snapshot
        RETURNING executions.id, executions.generation
    )
    SELECT registered.id, registered.generation, snapshot.name
    INTO execution_id, agent_generation, subscription
    FROM registered, snapshot;
    IF execution_id IS NULL THEN
        RAISE EXCEPTION 'a restart of agent % was enqueued while it registered', p_agent
            USING ERRCODE = 'SW002';
    END IF;
END
$$


-- upgrade: function enqueue_v2
CREATE FUNCTION switcher.enqueue_v2(
    p_kind text, p_agent_id bigint, p_generation bigint, p_payload jsonb, p_channel text,
    OUT message_id bigint, OUT wake boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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
$$


-- upgrade: function claim_v2
CREATE FUNCTION switcher.claim_v2(
    p_worker text, p_limit integer, p_lease interval, p_placement text, p_kinds text[])
RETURNS TABLE (id bigint, kind text, agent_id bigint, agent text, generation bigint, payload jsonb,
               attempts integer, lease_no integer, enqueued_at timestamptz)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_sort = off
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
$$


-- upgrade: subscription_load follows agents.subscription_id, whoever writes it
CREATE TRIGGER agents_track_load AFTER INSERT OR DELETE ON switcher.agents
FOR EACH ROW EXECUTE FUNCTION switcher.track_load_v2('32')

-- upgrade: ... and every move of an agent
CREATE TRIGGER agents_track_moves AFTER UPDATE OF subscription_id ON switcher.agents
FOR EACH ROW WHEN (OLD.subscription_id IS DISTINCT FROM NEW.subscription_id)
EXECUTE FUNCTION switcher.track_load_v2('32')

-- upgrade: a new subscription starts with empty load shards
CREATE TRIGGER subscriptions_add_load_shards AFTER INSERT ON switcher.subscriptions
FOR EACH ROW EXECUTE FUNCTION switcher.add_load_shards_v2('32')


-- downgrade: the triggers
DROP TRIGGER subscriptions_add_load_shards ON switcher.subscriptions

-- downgrade: the triggers
DROP TRIGGER agents_track_moves ON switcher.agents

-- downgrade: the triggers
DROP TRIGGER agents_track_load ON switcher.agents

-- downgrade: the functions (0001's come back afterwards)
DROP FUNCTION switcher.assign_v2(text, text, text, text, text, text),
              switcher.handle_failure_v2(text, text, text, bigint, text, text, text, boolean, text[],
                                         text, text, text),
              switcher.report_answer_v2(text, bigint),
              switcher.move_agent_v2(bigint, bigint, text, bigint, text, text, text, boolean, text, text,
                                     text),
              switcher.reserve_v2(bigint, bigint, interval, boolean),
              switcher.add_load_shards_v2(),
              switcher.track_load_v2(),
              switcher.eligible_v2(bigint, interval, bigint),
              switcher.enter_execution_v2(text, text, interval, interval, integer, text),
              switcher.enqueue_v2(text, bigint, bigint, jsonb, text),
              switcher.claim_v2(text, integer, interval, text, text[])

-- downgrade: the new tables
DROP TABLE switcher.drainers, switcher.executions, switcher.deliveries, switcher.subscription_load

-- downgrade: settings
ALTER TABLE switcher.settings DROP COLUMN webhook, DROP COLUMN retention

-- downgrade: events and cancellations have no place in 0001's outbox
DELETE FROM switcher.outbox WHERE agent_id IS NULL

-- downgrade: events and cancellations have no place in 0001's outbox
UPDATE switcher.outbox SET status = 'dead' WHERE status = 'cancelled'

-- downgrade: the outbox
ALTER TABLE switcher.outbox DROP COLUMN lease_no, ALTER COLUMN agent_id SET NOT NULL,
    DROP CONSTRAINT outbox_status_check,
    ADD CONSTRAINT outbox_status_check
        CHECK (status IN ('pending', 'running', 'done', 'dead', 'superseded'))

-- downgrade: failures
ALTER TABLE switcher.failures DROP COLUMN report_id, DROP COLUMN outcome,
    DROP COLUMN new_subscription_id, DROP COLUMN generation, DROP COLUMN restart_id

-- downgrade: agents
ALTER TABLE switcher.agents DROP COLUMN placement, RESET (fillfactor)

-- downgrade: 0001's indexes
CREATE INDEX agents_subscription_id_idx ON switcher.agents (subscription_id)

-- downgrade: 0001's indexes
CREATE INDEX failures_agent_id_idx ON switcher.failures (agent_id)

-- downgrade: 0001's indexes
CREATE INDEX switches_agent_id_idx ON switcher.switches (agent_id, id)

-- downgrade: 0001's indexes
DROP INDEX switcher.outbox_pending_idx

-- downgrade: 0001's indexes
CREATE INDEX outbox_due_idx ON switcher.outbox (available_at, id) WHERE status = 'pending'

-- downgrade: 0001's indexes
ALTER TABLE switcher.outbox RESET (fillfactor)
