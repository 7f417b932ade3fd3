-- Keeps a usage row under 200 bytes on disk. The per-organization and per-key B-trees cost about 95 bytes a row
-- each, more than half the row again; per-organization and per-key questions are answered by usage_hourly (indexed
-- by both), and individual decisions are found by time: rows are appended in time order, so a BRIN index on ts
-- (a few kilobytes per month) narrows a time range to the pages that hold it.
DROP INDEX api_usage_org_ts;
DROP INDEX api_usage_key_ts;
CREATE INDEX api_usage_ts ON api_usage USING brin (ts) WITH (pages_per_range = 32);
