-- In-flight executions of agents, and the gate a drainer closes while it restarts an agent.
--
-- A backend wraps each execution (a chat, a scheduled task) in Switcher.execution(): a row here, renewed
-- while it runs, expiring after its ttl if its holder dies. Before stopping a container a drainer closes
-- the agent's gate -- a session-level advisory lock on (p_gate_class, agent id), held by the drainer's
-- connection until the new container runs -- and then waits for the agent's live executions to end.
-- A new execution takes the same lock in shared mode while it registers, so it waits for a closed gate
-- (up to its gate_timeout) and the drainer's check waits for a registration in progress: the two never
-- race. A drainer that dies releases the gate with its connection.


-- function: enter_execution_v2
CREATE FUNCTION switcher.enter_execution_v2(
    p_agent text, p_holder text, p_ttl interval, p_gate_timeout text, p_gate_class integer,
    OUT execution_id bigint, OUT subscription text, OUT agent_generation bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
-- Register an execution once the agent's gate is open; its snapshot is read after the gate, so it is
-- what the restarted container runs. Waiting longer than p_gate_timeout raises lock_not_available.
-- No row: unknown agent.
DECLARE
    v_agent_id bigint;
    v_lock_timeout text := current_setting('lock_timeout');
BEGIN
    SELECT a.id INTO v_agent_id FROM switcher.agents a WHERE a.name = p_agent;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', p_gate_timeout, true);
    PERFORM pg_advisory_xact_lock_shared(p_gate_class, (v_agent_id % 2147483648)::integer);
    PERFORM set_config('lock_timeout', v_lock_timeout, true);
    INSERT INTO switcher.executions (agent_id, generation, holder, expires_at)
    SELECT a.id, a.generation, p_holder, now() + p_ttl FROM switcher.agents a WHERE a.id = v_agent_id
    RETURNING executions.id, executions.generation INTO execution_id, agent_generation;
    SELECT s.name INTO subscription
    FROM switcher.agents a JOIN switcher.subscriptions s ON s.id = a.subscription_id
    WHERE a.id = v_agent_id;
END
$$;


-- name: enter
SELECT execution_id, subscription, agent_generation
FROM switcher.enter_execution_v2(:agent, :holder, :ttl, :gate_timeout, :gate_class)
WHERE execution_id IS NOT NULL

-- name: renew
UPDATE switcher.executions SET expires_at = now() + :ttl WHERE id = :id RETURNING id

-- name: leave
DELETE FROM switcher.executions WHERE id = :id

-- name: close_gate
-- On a connection the drainer holds until it opens the gate again.
SELECT pg_advisory_lock(:gate_class, (CAST(:agent_id AS bigint) % 2147483648)::integer)

-- name: open_gate
SELECT pg_advisory_unlock(:gate_class, (CAST(:agent_id AS bigint) % 2147483648)::integer)

-- name: live_executions
SELECT count(*) FROM switcher.executions WHERE agent_id = :agent_id AND expires_at > now()

-- name: forget_expired
DELETE FROM switcher.executions WHERE expires_at < now() - interval '1 minute'
