-- 0003: what a caller's call reads does not grow with the history.
--
-- Why: a session keeps the generic plans it made for a function's statements until the next ANALYZE of
-- their tables. Plans made while failures and the outbox were nearly empty (as ANALYZE finds them right
-- after installation, or autovacuum after their first 50 rows) scan those tables, and from then on every
-- switch read the whole history, which grows by a row or two per switch, faster than autovacuum looks:
-- measured, 160 buffers per switch with no history and 5,771 with 20,000 rows, and pgbench throughput
-- falling tenfold within a minute of a fresh install. So the functions a caller enters set
-- enable_seqscan = off: with seq scans off, each lookup's plan is its index probe, whatever the
-- statistics say.
--
-- One lookup had no index to probe: an execution's registration (enter_execution_v2) asks whether the
-- agent has a restart pending or running, and neither partial index of the outbox covers both states, so
-- it read every message on record, twice, whatever the plan. outbox_unfinished_idx covers exactly that
-- question. Building it blocks writes to the outbox for as long as it takes to read the table once.
--
-- Only settings change, not bodies or behaviour, so the functions keep their names: code of 0002 and of
-- 0003 call the same functions during a deploy. Statements nested in these functions (move_agent_v2,
-- reserve_v2, report_answer_v2, the load-shard trigger) are planned under the caller's setting when a
-- caller's call reaches them first; they read only subscriptions and load shards, which do not grow.


-- upgrade: the restarts of an agent that are not finished, for an execution's registration
CREATE INDEX outbox_unfinished_idx ON switcher.outbox (agent_id, kind)
    WHERE status IN ('pending', 'running')

-- upgrade: plans that stay index probes
ALTER FUNCTION switcher.handle_failure_v2(
    text, text, text, bigint, text, text, text, boolean, text[], text, text, text) SET enable_seqscan = off

-- upgrade: plans that stay index probes
ALTER FUNCTION switcher.assign_v2(text, text, text, text, text, text) SET enable_seqscan = off

-- upgrade: plans that stay index probes
ALTER FUNCTION switcher.eligible_v2(bigint, interval, bigint) SET enable_seqscan = off

-- upgrade: plans that stay index probes
ALTER FUNCTION switcher.enqueue_v2(text, bigint, bigint, jsonb, text) SET enable_seqscan = off

-- upgrade: plans that stay index probes
ALTER FUNCTION switcher.claim_v2(text, integer, interval, text, text[]) SET enable_seqscan = off

-- upgrade: plans that stay index probes
ALTER FUNCTION switcher.enter_execution_v2(text, text, interval, interval, integer, text)
    SET enable_seqscan = off


-- downgrade: 0002's settings
ALTER FUNCTION switcher.handle_failure_v2(
    text, text, text, bigint, text, text, text, boolean, text[], text, text, text) RESET enable_seqscan

-- downgrade: 0002's settings
ALTER FUNCTION switcher.assign_v2(text, text, text, text, text, text) RESET enable_seqscan

-- downgrade: 0002's settings
ALTER FUNCTION switcher.eligible_v2(bigint, interval, bigint) RESET enable_seqscan

-- downgrade: 0002's settings
ALTER FUNCTION switcher.enqueue_v2(text, bigint, bigint, jsonb, text) RESET enable_seqscan

-- downgrade: 0002's settings
ALTER FUNCTION switcher.claim_v2(text, integer, interval, text, text[]) RESET enable_seqscan

-- downgrade: 0002's settings
ALTER FUNCTION switcher.enter_execution_v2(text, text, interval, interval, integer, text)
    RESET enable_seqscan

-- downgrade: 0002's indexes
DROP INDEX switcher.outbox_unfinished_idx
