-- Rate-limit tiers as data, shadow mode for tiers and organizations, and the shadow decision on usage rows.

-- A tier has up to two rolling-window limits (e.g. 1000 per hour and 50 per minute). Window lengths are seconds,
-- so a tier like "20 per 10 s" is just data. NULL limit = no such limit.
CREATE TABLE rate_limit_tiers (
    name                  text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    window_limit          bigint      CHECK (window_limit > 0),
    window_seconds        integer     NOT NULL DEFAULT 3600 CHECK (window_seconds BETWEEN 1 AND 86400),
    burst_limit           bigint      CHECK (burst_limit > 0),
    burst_seconds         integer     NOT NULL DEFAULT 60 CHECK (burst_seconds BETWEEN 1 AND 86400),
    -- Shadow: the tier's limits are computed, counted and recorded, but never deny.
    shadow                boolean     NOT NULL DEFAULT false,
    created_at            timestamptz NOT NULL DEFAULT now(),
    -- Bumped by every change, so validators refresh the keys of a changed tier.
    updated_at            timestamptz NOT NULL DEFAULT now()
);
INSERT INTO rate_limit_tiers (name, window_limit, window_seconds) VALUES
    ('unlimited', NULL, 3600),
    ('premium', 1000, 3600),
    ('standard', 100, 3600),
    ('limited', 10, 3600);

ALTER TABLE api_keys DROP CONSTRAINT api_keys_rate_limit_tier_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_rate_limit_tier_fkey
    FOREIGN KEY (rate_limit_tier) REFERENCES rate_limit_tiers (name);

-- Shadow for the organization's own limits (per minute and monthly quota).
ALTER TABLE organizations ADD COLUMN rate_limit_shadow boolean NOT NULL DEFAULT false;

-- What a shadow-mode limit would have decided (e.g. 'rate_limited') for a request that was let through; NULL when
-- no shadow limit would have denied it.
ALTER TABLE api_usage ADD COLUMN shadow_outcome text;
