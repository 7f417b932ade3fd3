-- A billing period's amount is overage × price in a bigint: a plan priced high enough overflows it, and the worker
-- that opens or raises such a period then fails its batch on every attempt, holding up every event behind it. At
-- most 10 000.00 per 1 000 units (in minor units), a month's bill overflows only past 9.2 × 10^12 units over the
-- included ones, millions of units a second all month long. NOT VALID: existing plans are left as they are.
SET LOCAL lock_timeout = '5s';

ALTER TABLE plans
    ADD CONSTRAINT plans_price_per_thousand_minor_at_most_1000000
    CHECK (price_per_thousand_minor <= 1000000) NOT VALID;
