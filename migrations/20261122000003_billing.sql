-- Plans and monthly billing periods, kept exact by the workers in the transaction that inserts the usage rows.

CREATE TABLE plans (
    name                     text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- Units (the requests' cost) included in a month at no charge.
    included_units           bigint      NOT NULL CHECK (included_units >= 0),
    -- Price of each 1 000 units over the included ones, in the currency's minor unit (cents).
    price_per_thousand_minor bigint      NOT NULL CHECK (price_per_thousand_minor >= 0),
    -- ISO 4217 code.
    currency                 text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    updated_at               timestamptz NOT NULL DEFAULT now()
);
INSERT INTO plans (name, included_units, price_per_thousand_minor, currency) VALUES
    ('free',          100000,  0, 'USD'),
    ('pro',          1000000, 50, 'USD'),
    ('enterprise',  10000000, 20, 'USD');

ALTER TABLE organizations ADD CONSTRAINT organizations_plan_fkey FOREIGN KEY (plan) REFERENCES plans (name);

-- One row per organization and calendar month (UTC). requests and units count allowed requests only and only
-- rows actually inserted into api_usage, so for every org and month:
--   requests = sum(usage_hourly.allowed) = count(api_usage rows with outcome 'allowed').
-- The plan's terms are copied when the period opens, so a plan edited mid-month does not rewrite past bills.
-- No foreign key to organizations, like api_usage: usage outlives organizations and bulk writes stay fast.
CREATE TABLE billing_periods (
    org_id                   uuid        NOT NULL,
    -- First day of the month (UTC).
    month                    date        NOT NULL CHECK (extract(day FROM month) = 1),
    plan                     text        NOT NULL,
    requests                 bigint      NOT NULL DEFAULT 0,
    units                    bigint      NOT NULL DEFAULT 0,
    included_units           bigint      NOT NULL,
    price_per_thousand_minor bigint      NOT NULL,
    currency                 text        NOT NULL,
    overage_units            bigint      GENERATED ALWAYS AS (greatest(units - included_units, 0)) STORED,
    -- Rounded up to the next minor unit.
    amount_minor             bigint      GENERATED ALWAYS AS
                                 ((greatest(units - included_units, 0) * price_per_thousand_minor + 999) / 1000) STORED,
    -- 'open' while the month can still receive events; the sweeper (a later issue) closes past months.
    status                   text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    opened_at                timestamptz NOT NULL DEFAULT now(),
    closed_at                timestamptz,
    updated_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, month)
);
CREATE INDEX billing_periods_month_status ON billing_periods (month, status);
