-- A new key, organization or tier is stamped with the time it is made, not with its transaction's start: an import
-- that waited for its organization's lock (held by another import, or by an operator's open transaction) longer
-- than the validators' refresh looks back was otherwise never seen by them, and a validator that had refused the key
-- meanwhile (a client presenting an imported key before its import) kept refusing it from its negative cache.
SET LOCAL lock_timeout = '5s';

ALTER TABLE api_keys ALTER COLUMN updated_at SET DEFAULT clock_timestamp();
ALTER TABLE organizations ALTER COLUMN updated_at SET DEFAULT clock_timestamp();
ALTER TABLE rate_limit_tiers ALTER COLUMN updated_at SET DEFAULT clock_timestamp();
