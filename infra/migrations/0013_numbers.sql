-- The numbers inventory (docs/design/numbers.md; the one writer: enforcement/numbers.py), kept
-- from telephony.number-events and from the renewals the numbers worker makes.
-- lease counts the number's activations on this account: a number released and activated
-- again is a new lease, whose signals and renewals are its own.
-- paid_through: the last month ("YYYY-MM", UTC) paid for; the next renewal is due on the first
-- of the month after it. monthly_fee: the fee last charged (activation or renewal);
-- one_time_fees: what the activation charged beyond the month (the setup fee).
-- unpaid_since: when a renewal was first found uncovered (auto-recharge gets its chance from
-- then); held_at / grace_until: On Hold, released at grace_until unless renewed first.
CREATE TABLE numbers (
    account_id      text NOT NULL REFERENCES accounts (id),
    number          text NOT NULL CHECK (number ~ '^\+[1-9][0-9]{1,14}$'),
    lease           integer NOT NULL DEFAULT 1 CHECK (lease >= 1),
    status          text NOT NULL CHECK (status IN ('active', 'on_hold', 'released')),
    auto_pay        boolean NOT NULL DEFAULT true,
    monthly_fee     bigint NOT NULL CHECK (monthly_fee >= 0),
    one_time_fees   bigint NOT NULL DEFAULT 0 CHECK (one_time_fees >= 0),
    activated_at    timestamptz NOT NULL,
    paid_through    text NOT NULL CHECK (paid_through ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    unpaid_since    timestamptz,
    held_at         timestamptz,
    hold_reason     text CHECK (hold_reason ~ '^[a-z0-9_]{1,64}$'),
    grace_until     timestamptz,
    released_at     timestamptz,
    release_reason  text CHECK (release_reason ~ '^[a-z0-9_]{1,64}$'),
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (account_id, number),
    CHECK ((status = 'on_hold') = (held_at IS NOT NULL AND grace_until IS NOT NULL)),
    CHECK ((status = 'released') = (released_at IS NOT NULL))
);

-- The worker's scan: numbers not released, by the month they are paid through.
CREATE INDEX numbers_due ON numbers (paid_through) WHERE status <> 'released';
-- The account's list, by status.
CREATE INDEX numbers_by_status ON numbers (account_id, status, number);
