-- A new key, organization or tier is stamped with the time it is made, not with its transaction's start (the
-- column's default, now()): an import that waited for its organization's lock (held by another import, or by an
-- operator's open transaction) longer than the validators' refresh looks back was otherwise never seen by them, and
-- a validator that had refused the key meanwhile (a client presenting an imported key before its import) kept
-- refusing it from its negative cache. The function of the UPDATE triggers stamps an INSERT too (OLD is null then).
-- Triggers rather than new column defaults: creating one locks out writes to its table for a moment, not reads as
-- ALTER TABLE would; organizations first, as key creation locks them (its organization's row, then api_keys).
SET LOCAL lock_timeout = '5s';

CREATE TRIGGER organizations_stamp_new BEFORE INSERT ON organizations
    FOR EACH ROW EXECUTE FUNCTION tollgate_stamp_change();
CREATE TRIGGER rate_limit_tiers_stamp_new BEFORE INSERT ON rate_limit_tiers
    FOR EACH ROW EXECUTE FUNCTION tollgate_stamp_change();
CREATE TRIGGER api_keys_stamp_new BEFORE INSERT ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tollgate_stamp_change();
