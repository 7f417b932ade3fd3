-- A month's partition of api_usage, built apart and then attached. `CREATE TABLE ... PARTITION OF` needs an
-- exclusive lock on api_usage: it waits for every open transaction that has read the table (an analyst's idle psql
-- session, a pg_dump), and every write queues behind it, so the first event of a month could stop the pipeline.
-- `ATTACH PARTITION` takes a lock that lets reads and writes go on. The month's bounds are computed in UTC whatever
-- the caller's time zone (an operator's session in another zone made a month a day or an hour off), and a lock
-- that cannot be had within 5 s fails the call, which the worker retries, instead of waiting without end.
CREATE OR REPLACE FUNCTION tollgate_ensure_usage_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql
SET timezone = 'UTC'
SET lock_timeout = '5s'
AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at);
    partition   text := 'api_usage_' || to_char(month_start, 'YYYY_MM');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tollgate_usage_partitions'));
    IF EXISTS (SELECT 1 FROM pg_inherits
               WHERE inhparent = 'api_usage'::regclass AND inhrelid = to_regclass(quote_ident(partition))) THEN
        RETURN partition;
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I (LIKE api_usage INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                   'INCLUDING STORAGE INCLUDING COMPRESSION)', partition);
    EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS %I ON %I (event_id)', partition || '_event_id', partition);
    -- The BRIN index on ts comes with the attaching.
    EXECUTE format('ALTER TABLE api_usage ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   partition, month_start, month_start + interval '1 month');
    RETURN partition;
END
$$;
