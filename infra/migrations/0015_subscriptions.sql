-- Subscriptions (docs/design/subscriptions.md; the one writer: enforcement/subscriptions.py):
-- an account's plan as something bought. accounts.plan_id stays the plan rating reads (the
-- included minutes of calls being charged); a subscription change writes both.
-- next_plan_id: a downgrade, taking effect at the next period's start. extensions: the seats
-- the tenant says it uses (the plan includes some, each further one at its rate).
-- trial_until: no fee is charged for periods starting before it.
CREATE TABLE subscriptions (
    account_id    text PRIMARY KEY REFERENCES accounts (id),
    plan_id       text NOT NULL REFERENCES plans (id),
    started_at    timestamptz NOT NULL,
    trial_until   timestamptz,
    extensions    integer NOT NULL DEFAULT 0 CHECK (extensions BETWEEN 0 AND 1000000),
    next_plan_id  text REFERENCES plans (id),
    updated_at    timestamptz NOT NULL
);

-- One row per account and period (calendar month, UTC) begun: the plan it runs on, the
-- allowance it has and the fee taken for it (a mid-period upgrade adds to both). The fee is
-- taken once per account and period: this row, and the ledger row's event key, say it was.
CREATE TABLE subscription_periods (
    account_id  text NOT NULL REFERENCES accounts (id),
    period      text NOT NULL CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    plan_id     text NOT NULL REFERENCES plans (id),
    included_s  integer NOT NULL CHECK (included_s >= 0),
    fee         bigint NOT NULL CHECK (fee >= 0),
    begun_at    timestamptz NOT NULL,
    PRIMARY KEY (account_id, period)
);

-- A plan's fee in the ledger: kind 'subscription'.
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('opening', 'call', 'sms', 'credit', 'correction', 'bundle', 'fee',
                    'provisional', 'subscription'));
