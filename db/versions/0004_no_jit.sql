-- 0004: the functions a caller enters are never compiled by JIT.
--
-- Why: 0003 set enable_seqscan = off on them, so that every lookup plans as its index probe. A plan that
-- has to scan anyway (eligible_v2 reads all of subscriptions, a few rows, and no index serves that) keeps
-- its seq scan, and PostgreSQL 15-17 cost a disabled node at 1e10 (18 counts disabled nodes apart from
-- cost). Such a plan is past jit_above_cost and every other JIT threshold, so wherever JIT is available
-- (the default in PostgreSQL's official images and Debian's packages) each switch compiled its
-- candidates query with inlining and optimization: measured on PostgreSQL 15, a switch took 105 ms at
-- the median instead of 1.1 ms. These functions run short lookups by index, which JIT never speeds up,
-- so they set jit = off, and every statement they reach (nested functions, triggers and foreign key
-- checks included) runs under it.
--
-- Only settings change, so the functions keep their names, as in 0003.


-- upgrade: no JIT for short lookups by index
ALTER FUNCTION switcher.handle_failure_v2(
    text, text, text, bigint, text, text, text, boolean, text[], text, text, text) SET jit = off

-- upgrade: no JIT for short lookups by index
ALTER FUNCTION switcher.assign_v2(text, text, text, text, text, text) SET jit = off

-- upgrade: no JIT for short lookups by index
ALTER FUNCTION switcher.eligible_v2(bigint, interval, bigint) SET jit = off

-- upgrade: no JIT for short lookups by index
ALTER FUNCTION switcher.enqueue_v2(text, bigint, bigint, jsonb, text) SET jit = off

-- upgrade: no JIT for short lookups by index
ALTER FUNCTION switcher.claim_v2(text, integer, interval, text, text[]) SET jit = off

-- upgrade: no JIT for short lookups by index
ALTER FUNCTION switcher.enter_execution_v2(text, text, interval, interval, integer, text) SET jit = off


-- downgrade: 0003's settings
ALTER FUNCTION switcher.handle_failure_v2(
    text, text, text, bigint, text, text, text, boolean, text[], text, text, text) RESET jit

-- downgrade: 0003's settings
ALTER FUNCTION switcher.assign_v2(text, text, text, text, text, text) RESET jit

-- downgrade: 0003's settings
ALTER FUNCTION switcher.eligible_v2(bigint, interval, bigint) RESET jit

-- downgrade: 0003's settings
ALTER FUNCTION switcher.enqueue_v2(text, bigint, bigint, jsonb, text) RESET jit

-- downgrade: 0003's settings
ALTER FUNCTION switcher.claim_v2(text, integer, interval, text, text[]) RESET jit

-- downgrade: 0003's settings
ALTER FUNCTION switcher.enter_execution_v2(text, text, interval, interval, integer, text) RESET jit
