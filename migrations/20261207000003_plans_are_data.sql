-- Plans are rows of `plans`, which operators add to; the first migration's fixed list of three names, which the
-- foreign key to `plans` has made redundant, refused any other.
SET LOCAL lock_timeout = '5s';
ALTER TABLE organizations DROP CONSTRAINT organizations_plan_check;
