-- Refunds (docs/design/refunds.md; the one writer: recharge/refund_store.py), operator only:
-- kind 'card': a succeeded payment given back to the card through the gateway, taken off the
-- balance (ledger kind 'refund', amount < 0, ref = the payment id); kind 'credit': money given
-- back as account credit (ledger kind 'refund', amount > 0, ref = the refund id).
--
-- id is the operator's idempotency key, scoped to the account as payment ids are; card
-- refunds and credits share one id space per account. gateway_key is what the gateway is
-- asked with on every retry ('<account_id>/refund/<id>', recharge.gateway.refund_key): unique,
-- so no two refunds can share a gateway refund. amount: micro-units, whole cents for a card.
-- The cap (a payment's pending and succeeded refunds never exceed what it captured) is kept
-- by the writer under a row lock of the payment (SELECT ... FOR UPDATE), in the transaction
-- that inserts the refund.
CREATE TABLE refunds (
    account_id   text    NOT NULL REFERENCES accounts (id),
    id           text    NOT NULL CHECK (id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    kind         text    NOT NULL CHECK (kind IN ('card', 'credit')),
    payment_id   text,
    amount       bigint  NOT NULL CHECK (amount > 0),
    currency     char(3) NOT NULL,
    status       text    NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    reason       text    NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    -- the gateway's answer, a failure's code ('gateway_refused', 'outcome_unknown', ...)
    outcome      text    NOT NULL DEFAULT '',
    message      text    NOT NULL DEFAULT '',
    gateway      text    NOT NULL DEFAULT '',
    -- the payment's charge at the gateway (Stripe: pi_...); '' for a credit
    charge_ref   text    NOT NULL DEFAULT '',
    gateway_key  text UNIQUE,
    -- the gateway's refund (Stripe: re_...)
    gateway_ref  text    NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    -- set once the Redis balance has it (the ledger row is written with 'succeeded')
    applied_at   timestamptz,
    PRIMARY KEY (account_id, id),
    FOREIGN KEY (account_id, payment_id) REFERENCES payments (account_id, id),
    CHECK ((kind = 'card') = (payment_id IS NOT NULL)),
    CHECK ((kind = 'card') = (gateway_key IS NOT NULL)),
    CHECK (kind = 'card' OR status = 'succeeded'),
    CHECK (kind = 'credit' OR amount % 10000 = 0)
);
CREATE INDEX refunds_payment ON refunds (account_id, payment_id) WHERE payment_id IS NOT NULL;
CREATE INDEX refunds_account_time ON refunds (account_id, created_at);
CREATE INDEX refunds_unsettled ON refunds (updated_at)
    WHERE status = 'pending' OR (status = 'succeeded' AND applied_at IS NULL);

-- A refund in the ledger: kind 'refund' (the list of 0016_invoices.sql, and 'refund').
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('opening', 'call', 'sms', 'credit', 'correction', 'bundle', 'fee',
                    'provisional', 'subscription', 'tax', 'refund'));
