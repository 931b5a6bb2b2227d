-- Plans as tiers a subscriber buys (seeds 001 and 004; docs/design/subscriptions.md).
-- billing_model: 'flat_rate' charges monthly_fee for the period and includes what is listed;
-- 'payg' charges no fee: extensions, DIDs and minutes at their rates are the whole price.
-- Rates are micro-units per unit and month (extension_rate, did_rate) beyond what is included
-- (under flat rate) or for every unit (under PAYG). max_concurrent_calls: live calls the
-- account may have at once, inbound and outbound together (0: no limit), enforced at
-- authorize with the credit reservation.
ALTER TABLE plans
    ADD COLUMN name text NOT NULL DEFAULT '' CHECK (length(name) <= 100),
    ADD COLUMN billing_model text NOT NULL DEFAULT 'flat_rate'
        CHECK (billing_model IN ('flat_rate', 'payg')),
    ADD COLUMN monthly_fee bigint NOT NULL DEFAULT 0 CHECK (monthly_fee >= 0),
    ADD COLUMN included_dids integer NOT NULL DEFAULT 0 CHECK (included_dids >= 0),
    ADD COLUMN included_extensions integer NOT NULL DEFAULT 0 CHECK (included_extensions >= 0),
    ADD COLUMN did_rate bigint NOT NULL DEFAULT 0 CHECK (did_rate >= 0),
    ADD COLUMN extension_rate bigint NOT NULL DEFAULT 0 CHECK (extension_rate >= 0),
    ADD COLUMN max_concurrent_calls integer NOT NULL DEFAULT 0
        CHECK (max_concurrent_calls >= 0),
    ADD COLUMN on_sale boolean NOT NULL DEFAULT true;
