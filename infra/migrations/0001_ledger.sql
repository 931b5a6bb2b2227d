-- The book of record. Redis holds the real-time truth and must be rebuildable from this.
-- Money columns are bigint micro-units (1 USD = 1,000,000); never numeric/float.

CREATE TABLE price_lists (
    id                   text PRIMARY KEY,
    currency             char(3) NOT NULL DEFAULT 'USD',
    inbound_per_min      bigint  NOT NULL CHECK (inbound_per_min >= 0),
    inbound_initial_s    integer NOT NULL DEFAULT 6 CHECK (inbound_initial_s >= 1),
    inbound_subsequent_s integer NOT NULL DEFAULT 6 CHECK (inbound_subsequent_s >= 1),
    sms_per_part         bigint  NOT NULL CHECK (sms_per_part >= 0),
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE price_list_rates (
    price_list_id text    NOT NULL REFERENCES price_lists (id) ON DELETE CASCADE,
    prefix        text    NOT NULL CHECK (prefix ~ '^[0-9]{1,15}$'),
    description   text    NOT NULL DEFAULT '',
    rate_per_min  bigint  NOT NULL CHECK (rate_per_min >= 0),
    connect_fee   bigint  NOT NULL DEFAULT 0 CHECK (connect_fee >= 0),
    initial_s     integer NOT NULL DEFAULT 6 CHECK (initial_s >= 1),
    subsequent_s  integer NOT NULL DEFAULT 6 CHECK (subsequent_s >= 1),
    PRIMARY KEY (price_list_id, prefix)
);

CREATE TABLE accounts (
    id                    text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    name                  text NOT NULL DEFAULT '',
    currency              char(3) NOT NULL DEFAULT 'USD',
    price_list_id         text NOT NULL REFERENCES price_lists (id),
    credit_limit          bigint NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
    low_balance_threshold bigint NOT NULL DEFAULT 0 CHECK (low_balance_threshold >= 0),
    -- Only operator decisions live here; hold/low follow from the balance (see Redis).
    suspended             boolean NOT NULL DEFAULT false,
    created_at            timestamptz NOT NULL DEFAULT now()
);

-- Append-only. One row per money movement; event_key is the 16-byte hash of the CloudEvent's
-- (source, id) for usage, or of a credit id for credits, so every write is idempotent.
CREATE TABLE ledger (
    entry_id    bigint GENERATED ALWAYS AS IDENTITY,
    event_key   bytea  NOT NULL CHECK (octet_length(event_key) = 16),
    account_id  text   NOT NULL,
    kind        text   NOT NULL CHECK (kind IN ('opening', 'call', 'sms', 'credit', 'correction')),
    amount      bigint NOT NULL,          -- signed: credits > 0, debits < 0
    quantity    integer NOT NULL DEFAULT 0, -- billed seconds, message parts
    ref         text   NOT NULL DEFAULT '', -- call_id, message_id, payment id
    rate_ref    text   NOT NULL DEFAULT '', -- price list and prefix that priced it
    event_time  timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    source      text   NOT NULL,
    event_id    text   NOT NULL,
    fingerprint bytea,
    CONSTRAINT ledger_pkey PRIMARY KEY (event_key)
);
CREATE INDEX ledger_account_time ON ledger (account_id, event_time);

CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();

-- Every signal handed to telephony, so seq survives a Redis rebuild and can be audited.
CREATE TABLE signals (
    account_id  text    NOT NULL,
    seq         integer NOT NULL,
    type        text    NOT NULL,
    reason      text    NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, seq)
);
