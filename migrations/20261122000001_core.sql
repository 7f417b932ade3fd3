-- Organizations, keys and their audit trail; usage rows and their hourly rollup.

CREATE TABLE organizations (
    id                    uuid        PRIMARY KEY,
    name                  text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    slug                  text        NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    plan                  text        NOT NULL DEFAULT 'free' CHECK (plan IN ('free', 'pro', 'enterprise')),
    active                boolean     NOT NULL DEFAULT true,
    -- NULL means no per-minute limit for the organization.
    rate_limit_per_minute integer     DEFAULT 60 CHECK (rate_limit_per_minute > 0),
    -- NULL means unlimited.
    monthly_request_limit bigint      CHECK (monthly_request_limit > 0),
    max_api_keys          integer     NOT NULL DEFAULT 100 CHECK (max_api_keys > 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX organizations_updated_at ON organizations (updated_at);

CREATE TABLE api_keys (
    id                           uuid        PRIMARY KEY,
    org_id                       uuid        NOT NULL REFERENCES organizations (id),
    name                         text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- Display only: the key's head (e.g. 'tg_live_AbCd') and last 4 characters. Never the key.
    prefix                       text        NOT NULL,
    key_hint                     text        NOT NULL,
    -- SHA-256 of the whole key.
    key_hash                     bytea       NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    role                         text        NOT NULL DEFAULT 'user' CHECK (role IN ('admin', 'user', 'guest')),
    scopes                       text[]      NOT NULL DEFAULT '{}',
    rate_limit_tier              text        NOT NULL DEFAULT 'standard'
                                             CHECK (rate_limit_tier IN ('unlimited', 'premium', 'standard', 'limited')),
    custom_rate_limit_per_minute integer     CHECK (custom_rate_limit_per_minute > 0),
    active                       boolean     NOT NULL DEFAULT true,
    expires_at                   timestamptz,
    revoked_at                   timestamptz,
    deactivated_reason           text,
    created_at                   timestamptz NOT NULL DEFAULT now(),
    -- Bumped by every change an operator makes (not by usage), so validators can refresh changed keys.
    updated_at                   timestamptz NOT NULL DEFAULT now(),
    last_used_at                 timestamptz,
    total_requests               bigint      NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_active_key_hash ON api_keys (key_hash) WHERE active;
CREATE INDEX api_keys_org_id ON api_keys (org_id);
CREATE INDEX api_keys_updated_at ON api_keys (updated_at);

CREATE TABLE key_audit (
    id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id  uuid        NOT NULL REFERENCES api_keys (id),
    org_id  uuid        NOT NULL REFERENCES organizations (id),
    -- created, imported, revoked, updated
    action  text        NOT NULL,
    -- who did it, e.g. 'cli:alice'
    actor   text        NOT NULL,
    details jsonb       NOT NULL DEFAULT '{}',
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX key_audit_key_id ON key_audit (key_id, at);

-- One row per decision on an identified key. No foreign keys: bulk inserts stay fast and usage outlives keys.
CREATE TABLE api_usage (
    event_id   uuid        NOT NULL,
    ts         timestamptz NOT NULL,
    org_id     uuid        NOT NULL,
    key_id     uuid        NOT NULL,
    units      integer     NOT NULL DEFAULT 1 CHECK (units > 0),
    latency_us integer     NOT NULL,
    outcome    text        NOT NULL,
    method     text        NOT NULL,
    path       text        NOT NULL,
    client_ip  inet,
    user_agent text,
    request_id text,
    -- ts is part of the key because a partitioned table's unique constraints must include the partition key;
    -- an event always carries the same ts, so a re-delivered event still conflicts.
    PRIMARY KEY (event_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX api_usage_org_ts ON api_usage (org_id, ts);
CREATE INDEX api_usage_key_ts ON api_usage (key_id, ts);

-- Creates the month's partition of api_usage if it is missing; safe to call concurrently.
CREATE FUNCTION tollgate_ensure_usage_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at, 'UTC');
    partition   text := 'api_usage_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tollgate_usage_partitions'));
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF api_usage FOR VALUES FROM (%L) TO (%L)',
                   partition, month_start, month_start + interval '1 month');
    RETURN partition;
END
$$;
SELECT tollgate_ensure_usage_partition(now());
SELECT tollgate_ensure_usage_partition(now() + interval '1 month');

-- Exact per-key hourly counts, maintained in the transaction that inserts the usage rows they count.
-- units counts allowed requests only: a denied request consumes nothing.
CREATE TABLE usage_hourly (
    org_id  uuid        NOT NULL,
    key_id  uuid        NOT NULL,
    hour    timestamptz NOT NULL,
    allowed bigint      NOT NULL DEFAULT 0,
    denied  bigint      NOT NULL DEFAULT 0,
    units   bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, hour, key_id)
);
CREATE INDEX usage_hourly_key_hour ON usage_hourly (key_id, hour);
