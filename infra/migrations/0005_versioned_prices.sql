-- Versioned inbound, SMS, number and one-time fee prices, as outbound rates are since 0003:
-- changing them must not re-price calls and messages already in flight or past. A version is
-- whole (every one of these prices) and in force from effective_from until the list's next
-- version; rating takes the one in force at the event's time (a call's answered_at), and the
-- first one for any earlier time (metering/rating.py).

CREATE TABLE price_list_prices (
    price_list_id        text        NOT NULL REFERENCES price_lists (id) ON DELETE CASCADE,
    effective_from       timestamptz NOT NULL,
    inbound_per_min      bigint      NOT NULL CHECK (inbound_per_min >= 0),
    inbound_initial_s    integer     NOT NULL DEFAULT 6 CHECK (inbound_initial_s >= 1),
    inbound_subsequent_s integer     NOT NULL DEFAULT 6 CHECK (inbound_subsequent_s >= 1),
    sms_per_part         bigint      NOT NULL CHECK (sms_per_part >= 0),
    number_monthly_fee   bigint      NOT NULL DEFAULT 0 CHECK (number_monthly_fee >= 0),
    PRIMARY KEY (price_list_id, effective_from)
);

-- Today's values become each list's first version, from its creation (whole seconds: rating
-- works in unix seconds, and fees are matched to their version on this value).
INSERT INTO price_list_prices (price_list_id, effective_from, inbound_per_min, inbound_initial_s,
                               inbound_subsequent_s, sms_per_part, number_monthly_fee)
SELECT id, date_trunc('second', created_at), inbound_per_min, inbound_initial_s,
       inbound_subsequent_s, sms_per_part, number_monthly_fee
FROM price_lists;

-- Fees belong to a version: a version's fee set is whole, like its other prices.
ALTER TABLE price_list_fees ADD COLUMN effective_from timestamptz;
UPDATE price_list_fees f SET effective_from = date_trunc('second', p.created_at)
FROM price_lists p WHERE p.id = f.price_list_id;
ALTER TABLE price_list_fees ALTER COLUMN effective_from SET NOT NULL;
ALTER TABLE price_list_fees DROP CONSTRAINT price_list_fees_pkey;
ALTER TABLE price_list_fees ADD PRIMARY KEY (price_list_id, effective_from, code);
ALTER TABLE price_list_fees ADD CONSTRAINT price_list_fees_version
    FOREIGN KEY (price_list_id, effective_from)
    REFERENCES price_list_prices (price_list_id, effective_from) ON DELETE CASCADE;

-- From here on rating reads price_list_prices only. The price columns of price_lists stay (a
-- row is still inserted with them) but only as the prices a new list opens with: this trigger
-- makes them its first version, so a price list is never without prices whoever inserts it.
-- They are not kept in step with later versions.
CREATE FUNCTION price_list_opening_prices() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO price_list_prices (price_list_id, effective_from, inbound_per_min,
                                   inbound_initial_s, inbound_subsequent_s, sms_per_part,
                                   number_monthly_fee)
    VALUES (NEW.id, date_trunc('second', NEW.created_at), NEW.inbound_per_min,
            NEW.inbound_initial_s, NEW.inbound_subsequent_s, NEW.sms_per_part,
            NEW.number_monthly_fee);
    RETURN NULL;
END $$;
CREATE TRIGGER price_lists_opening_prices AFTER INSERT ON price_lists
    FOR EACH ROW EXECUTE FUNCTION price_list_opening_prices();
