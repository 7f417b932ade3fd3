-- A month's partition is found by the range it covers, not by its name, and always has its unique index on
-- event_id, the one thing that makes a re-delivered event a no-op (api_usage itself has no unique key: it would
-- have to include ts).
--
-- Before, a partition attached under another name (an operator's, or one renamed to archive it and attached
-- again) made every batch with an event of that month fail on ATTACH for good; and a partition without the index
-- (made by hand with CREATE TABLE ... PARTITION OF, or made after an archived one had kept the index's name) took
-- every re-delivered event again, counting it twice in usage_hourly and billing.
CREATE OR REPLACE FUNCTION tollgate_ensure_usage_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql
SET timezone = 'UTC'
SET lock_timeout = '5s'
AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at);
    month_end   timestamptz := month_start + interval '1 month';
    partition   regclass;
    name        text := 'api_usage_' || to_char(month_start, 'YYYY_MM');
    twice       boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tollgate_usage_partitions'));
    -- The partition that takes this month's rows, whatever its name. Bounds read back as
    -- FOR VALUES FROM ('…') TO ('…') (in UTC under this function's time zone), or MINVALUE / MAXVALUE; a default
    -- partition has none. Only api_usage's partitions are read (materialized first): another table's bounds need
    -- not be times.
    WITH parts AS MATERIALIZED (
        SELECT c.oid, regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                   'FROM \(''?(MINVALUE|[^'')]+)''?\) TO \(''?(MAXVALUE|[^'')]+)''?\)') AS bounds
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'api_usage'::regclass
    )
    SELECT oid::regclass INTO partition
    FROM parts
    WHERE bounds IS NOT NULL
      -- CASE, not OR: the casts must not be tried on MINVALUE / MAXVALUE.
      AND CASE WHEN bounds[1] = 'MINVALUE' THEN true ELSE bounds[1]::timestamptz <= month_start END
      AND CASE WHEN bounds[2] = 'MAXVALUE' THEN true ELSE bounds[2]::timestamptz >= month_end END
    LIMIT 1;
    IF partition IS NULL THEN
        EXECUTE format('CREATE TABLE IF NOT EXISTS %I (LIKE api_usage INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                       'INCLUDING STORAGE INCLUDING COMPRESSION)', name);
        partition := quote_ident(name)::regclass;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attname = 'event_id'
                   WHERE x.indrelid = partition AND x.indisunique AND x.indisvalid AND x.indimmediate
                     AND x.indpred IS NULL AND x.indexprs IS NULL AND x.indnkeyatts = 1 AND x.indkey[0] = a.attnum) THEN
        -- A partition that went without the index may hold an event twice: the index cannot be built then, and
        -- saying so beats failing on it at every batch with PostgreSQL's bare message.
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s GROUP BY event_id HAVING count(*) > 1)', partition)
            INTO STRICT twice;
        IF twice THEN
            -- All in the message: the worker's log shows the message, not a hint.
            RAISE EXCEPTION 'usage partition % has no unique index on event_id and holds some event more than once '
                            '(its month''s usage_hourly and billing count those twice): keep one row per event_id '
                            '(SELECT event_id, count(*) FROM % GROUP BY 1 HAVING count(*) > 1 lists them), and writes '
                            'to it resume', partition, partition;
        END IF;
        -- Unnamed: PostgreSQL picks a free name in the partition's schema (an archived partition's index may keep
        -- the usual one).
        EXECUTE format('CREATE UNIQUE INDEX ON %s (event_id)', partition);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = 'api_usage'::regclass AND inhrelid = partition) THEN
        -- The BRIN index on ts comes with the attaching.
        EXECUTE format('ALTER TABLE api_usage ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)',
                       partition, month_start, month_end);
    END IF;
    RETURN partition::text;
END
$$;
