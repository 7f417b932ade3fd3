-- Keeps a typical usage row well under 200 bytes on disk, indexes included.
--
-- The per-organization and per-key B-trees cost about 95 bytes a row each, more than half the row again; totals per
-- organization and per key come from usage_hourly (indexed by both), and individual decisions are found by time:
-- rows arrive in time order, so a BRIN index on ts (a few kilobytes a month) narrows a time range to its pages.
DROP INDEX api_usage_org_ts;
DROP INDEX api_usage_key_ts;
CREATE INDEX api_usage_ts ON api_usage USING brin (ts) WITH (pages_per_range = 32);

-- Outcomes as an enum: 4 bytes instead of a text's 8 to 15, and still readable (outcome = 'allowed' works).
-- Adding an Outcome in the code needs `ALTER TYPE usage_outcome ADD VALUE` (a test compares the two lists).
CREATE TYPE usage_outcome AS ENUM
    ('allowed', 'revoked', 'expired', 'disabled', 'rate_limited', 'quota_exceeded', 'insufficient_scope');
ALTER TABLE api_usage
    ALTER COLUMN outcome TYPE usage_outcome USING outcome::usage_outcome,
    ALTER COLUMN shadow_outcome TYPE usage_outcome USING shadow_outcome::usage_outcome;

-- An event is unique by its id alone within its partition (its ts, and so its partition, never changes), so each
-- partition gets a unique index on event_id (24 bytes an entry) instead of a primary key on (event_id, ts) (32),
-- which a partitioned table would need across partitions. A re-delivered event still conflicts.
ALTER TABLE api_usage DROP CONSTRAINT api_usage_pkey;

CREATE OR REPLACE FUNCTION tollgate_ensure_usage_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at, 'UTC');
    partition   text := 'api_usage_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tollgate_usage_partitions'));
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF api_usage FOR VALUES FROM (%L) TO (%L)',
                   partition, month_start, month_start + interval '1 month');
    EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS %I ON %I (event_id)', partition || '_event_id', partition);
    RETURN partition;
END
$$;

DO $$
DECLARE
    partition text;
BEGIN
    FOR partition IN SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'api_usage'::regclass LOOP
        EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS %I ON %I (event_id)', partition || '_event_id', partition);
    END LOOP;
END
$$;

-- User agents, each stored once: a usage row holds the id (4 bytes instead of the string, typically 20 to 200
-- bytes, and a handful of distinct values per API). The workers add new ones before writing the rows.
CREATE TABLE user_agents (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_agent text    NOT NULL UNIQUE
);
INSERT INTO user_agents (user_agent)
SELECT DISTINCT user_agent FROM api_usage WHERE user_agent IS NOT NULL ORDER BY 1;
ALTER TABLE api_usage ADD COLUMN user_agent_id integer;
UPDATE api_usage u SET user_agent_id = a.id FROM user_agents a WHERE a.user_agent = u.user_agent;
ALTER TABLE api_usage DROP COLUMN user_agent;
