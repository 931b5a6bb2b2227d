-- Every suspension has an origin, and only what may lift that origin lifts it
-- (docs/design/status-origins.md; the rules: enforcement/account_admin.py, the one writer).
-- An account is suspended while it has at least one row here: 'operator' (a platform operator),
-- 'manager' (the admin of the account's manager), 'tenant' (the account's own admin),
-- 'past_due' (an overdue invoice: only an operator, or later its payment, lifts it).
-- accounts.suspended stays, kept true exactly while rows exist (written in the same
-- transaction): the Redis rebuild reads it. set_by: the API key (key_id) or the tool that
-- suspended it; null for the suspensions this migration carries over.
CREATE TABLE account_suspensions (
    account_id  text NOT NULL REFERENCES accounts (id),
    origin      text NOT NULL CHECK (origin IN ('operator', 'manager', 'tenant', 'past_due')),
    reason      text NOT NULL CHECK (reason ~ '^[a-z0-9_]{1,64}$'),
    set_by      text CHECK (length(set_by) <= 100),
    set_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, origin)
);

-- Before origins, only an admin's key could suspend, and only the operator was meant to: what is
-- suspended now is the operator's, so no customer's resume lifts it. Its reason is the one of the
-- last account.suspend signal recorded, where there is one.
INSERT INTO account_suspensions (account_id, origin, reason)
    SELECT a.id, 'operator', coalesce(
        (SELECT s.reason FROM signals s
          WHERE s.account_id = a.id AND s.type = 'account.suspend'
            AND s.reason ~ '^[a-z0-9_]{1,64}$'
          ORDER BY s.seq DESC LIMIT 1),
        'operator')
    FROM accounts a WHERE a.suspended;
