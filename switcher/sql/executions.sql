-- In-flight executions of agents, and the gate that keeps new ones out while an agent restarts.
--
-- A backend wraps each execution (a chat, a scheduled task) in Switcher.execution(): a row here, renewed
-- while it runs, expiring after its ttl if its holder dies. Two rules keep executions and restarts apart:
--
-- 1. A new execution does not start while a restart of its agent is pending or running: it would run on
--    the container's old credential, yet carry the new assignment as its snapshot, and a failure it
--    reported would move the agent again (A->B->C). It waits (up to its gate_timeout) until the restart
--    is delivered, then takes the new snapshot.
-- 2. Before stopping a container, a drainer closes the agent's gate -- a session-level advisory lock on
--    (p_gate_class, agent id), held by its connection until the new container runs -- and then waits for
--    the agent's live executions to end. A new execution takes the same lock in shared mode while it
--    registers, so it waits for a closed gate and the drainer's check waits for a registration in
--    progress: the two never race. A drainer that dies releases the gate with its connection.


-- function: enter_execution_v2
CREATE FUNCTION switcher.enter_execution_v2(
    p_agent text, p_holder text, p_ttl interval, p_gate_timeout interval, p_gate_class integer,
    p_restart_kind text,
    OUT execution_id bigint, OUT subscription text, OUT agent_generation bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET jit = off
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
$$;


-- name: enter
SELECT execution_id, subscription, agent_generation
FROM switcher.enter_execution_v2(:agent, :holder, :ttl, :gate_timeout, :gate_class, :restart_kind)
WHERE execution_id IS NOT NULL

-- name: renew
UPDATE switcher.executions SET expires_at = now() + :ttl WHERE id = :id RETURNING id

-- name: leave
DELETE FROM switcher.executions WHERE id = :id

-- name: close_gate
-- On a connection the drainer holds until it opens the gate again (autocommit: the lock_timeout is this
-- statement's only). Executions that register meanwhile queue behind it.
WITH waiting AS (SELECT set_config('lock_timeout', :lock_timeout, true))
SELECT pg_advisory_lock(:gate_class, (CAST(:agent_id AS bigint) % 2147483648)::integer) FROM waiting

-- name: open_gate
SELECT pg_advisory_unlock(:gate_class, (CAST(:agent_id AS bigint) % 2147483648)::integer)

-- name: live_executions
SELECT count(*) FROM switcher.executions WHERE agent_id = :agent_id AND expires_at > now()

-- name: forget_expired
DELETE FROM switcher.executions WHERE expires_at < now() - interval '1 minute'
