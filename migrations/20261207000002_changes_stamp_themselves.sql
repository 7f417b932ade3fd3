-- Validators learn of a changed key, organization or tier by its updated_at. These triggers stamp every change,
-- Tollgate's own operations and an operator's SQL (UPDATE organizations SET active = false ...) alike, which would
-- otherwise reach no validator until its cached keys were read again minutes later. The stamp is the time of the
-- change (clock_timestamp()), not of its transaction's start, which may be long before the commit (a change that
-- waited for a lock). The workers' bookkeeping on a key (last_used_at, total_requests) is not a change a validator
-- needs, and is left out.
SET LOCAL lock_timeout = '5s';

CREATE OR REPLACE FUNCTION tollgate_stamp_change() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    -- The trigger's arguments: columns whose change is not one.
    ignored text[] := TG_ARGV || ARRAY['updated_at'];
BEGIN
    IF to_jsonb(NEW) - ignored IS DISTINCT FROM to_jsonb(OLD) - ignored THEN
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END
$$;

-- The workers' updates always raise total_requests: the WHEN clause spares them the function call altogether.
CREATE TRIGGER api_keys_stamp_change BEFORE UPDATE ON api_keys
    FOR EACH ROW WHEN (NEW.total_requests IS NOT DISTINCT FROM OLD.total_requests)
    EXECUTE FUNCTION tollgate_stamp_change('last_used_at');
CREATE TRIGGER organizations_stamp_change BEFORE UPDATE ON organizations
    FOR EACH ROW EXECUTE FUNCTION tollgate_stamp_change();
CREATE TRIGGER rate_limit_tiers_stamp_change BEFORE UPDATE ON rate_limit_tiers
    FOR EACH ROW EXECUTE FUNCTION tollgate_stamp_change();
