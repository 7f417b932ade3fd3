-- Validators find changed keys, organizations and tiers by the transaction that changed them, not by the time.
-- Looking for changes stamped since a few seconds before the last look missed for good a change whose commit became
-- visible later than that after its stamp: an operator's transaction left open a while, a commit waiting for a
-- synchronous standby, a primary whose clock is behind its predecessor's. Each look reads, in one snapshot, the
-- changes of the transactions the previous look's snapshot could not see (those running then, and every later one),
-- so it finds a change whenever it commits, whatever the clocks say, and reads none twice.
--
-- `changed_in` is the 64-bit id (pg_current_xact_id()) of the transaction of the row's last change, set by the same
-- triggers as updated_at; rows last changed before this migration hold 0. Adding the columns with a constant default
-- changes no row, but locks the tables until the migration commits, after the indexes are built: reads of keys that
-- no validator holds wait that long (building such an index on a test table of a million rows took 0.14 s on a
-- 2-vCPU machine). The indexes on updated_at stay while validators of earlier releases may run (a rolling update, a
-- rollback): their look-up by time would read every key each second without them.
SET LOCAL lock_timeout = '5s';

ALTER TABLE organizations ADD COLUMN changed_in bigint NOT NULL DEFAULT 0;
ALTER TABLE rate_limit_tiers ADD COLUMN changed_in bigint NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN changed_in bigint NOT NULL DEFAULT 0;
CREATE INDEX organizations_changed_in ON organizations (changed_in);
CREATE INDEX api_keys_changed_in ON api_keys (changed_in);

CREATE OR REPLACE FUNCTION tollgate_stamp_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    -- The trigger's arguments: columns whose change is not one.
    ignored text[] := TG_ARGV || ARRAY['updated_at', 'changed_in'];
BEGIN
    IF to_jsonb(NEW) - ignored IS DISTINCT FROM to_jsonb(OLD) - ignored THEN
        NEW.updated_at := clock_timestamp();
        NEW.changed_in := pg_current_xact_id()::text::bigint;
    END IF;
    RETURN NEW;
END
$$;
