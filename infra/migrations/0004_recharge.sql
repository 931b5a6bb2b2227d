-- Payments: manual top-ups and auto-recharge, the saved payment method, and the rules' state.
-- See recharge/policy.py for the rules and recharge/service.py for the order of writes.

-- Level-2 verification lifts the new-account payment limits. hold_reason is set while the
-- service holds an account for a reason its credit does not explain ('recharge_cap'); it is
-- durable so a Redis rebuild holds the account again.
ALTER TABLE accounts
    ADD COLUMN verification_level smallint NOT NULL DEFAULT 1 CHECK (verification_level IN (1, 2)),
    ADD COLUMN hold_reason text;

-- One saved method per account: replacing it means deleting this row (and detaching it at the
-- gateway) first.
CREATE TABLE payment_methods (
    account_id   text PRIMARY KEY REFERENCES accounts (id),
    gateway      text NOT NULL,
    customer_ref text NOT NULL,
    method_ref   text NOT NULL,
    brand        text NOT NULL DEFAULT '',
    last4        text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE auto_recharge (
    account_id       text PRIMARY KEY REFERENCES accounts (id),
    enabled          boolean NOT NULL,
    threshold_amount bigint  NOT NULL CHECK (threshold_amount >= 0),
    recharge_amount  bigint  NOT NULL CHECK (recharge_amount >= 10000000),
    -- why the service turned it off (e.g. 'repeated_declines'); cleared when an admin sets it
    disabled_reason  text,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- A trigger decided by debit.lua (edge-triggered, once per crossing): the account's signal
-- seq names it. The worker attempts it until it is done or cancelled.
CREATE TABLE recharge_triggers (
    account_id      text    NOT NULL REFERENCES accounts (id),
    seq             integer NOT NULL,
    status          text    NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    declines        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_outcome    text    NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, seq)
);
CREATE INDEX recharge_triggers_due ON recharge_triggers (next_attempt_at) WHERE status = 'open';

-- Every payment attempt, also those the rules refused (status 'refused', nothing charged), so
-- the history says why a recharge did not happen. id is the gateway's idempotency key.
-- amount: what was asked of the card; captured: what the gateway took (credited exactly).
CREATE TABLE payments (
    id           text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    account_id   text    NOT NULL REFERENCES accounts (id),
    kind         text    NOT NULL CHECK (kind IN ('auto', 'manual')),
    trigger_seq  integer,
    amount       bigint  NOT NULL CHECK (amount >= 0),
    captured     bigint  NOT NULL DEFAULT 0 CHECK (captured >= 0),
    currency     char(3) NOT NULL,
    status       text    NOT NULL
        CHECK (status IN ('pending', 'succeeded', 'declined', 'failed', 'refused')),
    reason       text    NOT NULL DEFAULT '',  -- decline code, refusal rule, failure
    message      text    NOT NULL DEFAULT '',
    gateway      text    NOT NULL DEFAULT '',
    gateway_ref  text    NOT NULL DEFAULT '',
    method       text    NOT NULL DEFAULT '',  -- "visa 4242"
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- set once the Redis balance has the credit (the ledger row is written with 'succeeded')
    credited_at  timestamptz,
    CHECK (status = 'succeeded' OR captured = 0)
);
CREATE INDEX payments_account_time ON payments (account_id, created_at);
CREATE INDEX payments_uncredited ON payments (updated_at)
    WHERE status = 'pending' OR (status = 'succeeded' AND credited_at IS NULL);
