-- Invoices and statements (docs/design/invoices.md; the one writer: enforcement/invoices.py).
--
-- billing_mode: 'prepaid' (every charge comes off the balance at once; the month's invoice is a
-- statement of it, issued paid) or 'invoiced' (charges accrue against the credit limit; the
-- invoice has a balance due and a due date). invoice_auto_pay: charge the saved card when an
-- invoice with a balance due is issued. tax_jurisdiction: which of tax_rates applies (none
-- configured for it: no tax line).
ALTER TABLE accounts
    ADD COLUMN billing_mode text NOT NULL DEFAULT 'prepaid'
        CHECK (billing_mode IN ('prepaid', 'invoiced')),
    ADD COLUMN invoice_auto_pay boolean NOT NULL DEFAULT false,
    ADD COLUMN tax_jurisdiction text CHECK (tax_jurisdiction ~ '^[A-Z]{2}(-[A-Z0-9]{1,3})?$');

-- Set by the operator: a jurisdiction's rate in parts per million (8.25 % = 82500).
CREATE TABLE tax_rates (
    jurisdiction  text PRIMARY KEY CHECK (jurisdiction ~ '^[A-Z]{2}(-[A-Z0-9]{1,3})?$'),
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    rate_ppm      integer NOT NULL CHECK (rate_ppm BETWEEN 0 AND 1000000),
    updated_at    timestamptz NOT NULL
);

-- Numbered without gaps per issuer (the platform, or a managed account's manager): the counter
-- is taken in the invoice's own transaction, so a number is used only by an invoice that exists.
CREATE TABLE invoice_counters (
    issuer  text PRIMARY KEY,
    last    integer NOT NULL CHECK (last >= 0)
);

CREATE TABLE invoices (
    id             text PRIMARY KEY CHECK (id ~ '^inv_[a-z0-9]{16}$'),
    account_id     text NOT NULL REFERENCES accounts (id),
    period         text NOT NULL CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    issuer         text NOT NULL,
    seq            integer NOT NULL CHECK (seq >= 1),
    number         text NOT NULL,
    billing_mode   text NOT NULL CHECK (billing_mode IN ('prepaid', 'invoiced')),
    currency       text NOT NULL,
    status         text NOT NULL
        CHECK (status IN ('sent', 'paid', 'partially_paid', 'overdue', 'cancelled')),
    issued_at      timestamptz NOT NULL,
    due_at         timestamptz NOT NULL,
    subtotal       bigint NOT NULL,
    tax            bigint NOT NULL CHECK (tax >= 0),
    tax_rate_ppm   integer NOT NULL DEFAULT 0,
    total          bigint NOT NULL,
    paid           bigint NOT NULL DEFAULT 0 CHECK (paid >= 0),
    cancelled_at   timestamptz,
    cancel_reason  text CHECK (length(cancel_reason) BETWEEN 1 AND 200),
    notified       text NOT NULL DEFAULT '',  -- past-due notices sent: 'overdue', 'warned'
    UNIQUE (account_id, period),
    UNIQUE (issuer, seq),
    CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL))
);
CREATE INDEX invoices_by_account ON invoices (account_id, issued_at DESC, id);
CREATE INDEX invoices_open ON invoices (due_at) WHERE status IN ('sent', 'partially_paid', 'overdue');

-- Line items: amounts in micro-units, charges > 0, credits < 0 (a refund credited, a
-- cancellation's give-back on a later invoice).
CREATE TABLE invoice_lines (
    invoice_id        text NOT NULL REFERENCES invoices (id),
    line              integer NOT NULL,
    kind              text NOT NULL,
    description       text NOT NULL,
    billing_group_id  text NOT NULL DEFAULT '',
    quantity          bigint NOT NULL,
    unit              text NOT NULL,
    amount            bigint NOT NULL,
    PRIMARY KEY (invoice_id, line)
);

-- Payments made for invoices (a payment of the payments table, by its id): 'pending' until
-- the payment succeeds (then 'applied', its captured amount in applied) or ends otherwise
-- ('failed').
CREATE TABLE invoice_payments (
    invoice_id  text NOT NULL REFERENCES invoices (id),
    account_id  text NOT NULL,
    payment_id  text NOT NULL,
    amount      bigint NOT NULL CHECK (amount > 0),
    state       text NOT NULL CHECK (state IN ('pending', 'applied', 'failed')),
    applied     bigint NOT NULL DEFAULT 0 CHECK (applied >= 0),
    created_at  timestamptz NOT NULL,
    applied_at  timestamptz,
    PRIMARY KEY (account_id, payment_id)
);
CREATE INDEX invoice_payments_pending ON invoice_payments (created_at) WHERE state = 'pending';

-- The tax an invoice adds, in the ledger (kind 'tax'), and a cancelled invoice's give-back
-- (kind 'correction', already allowed).
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('opening', 'call', 'sms', 'credit', 'correction', 'bundle', 'fee',
                    'provisional', 'subscription', 'tax'));
