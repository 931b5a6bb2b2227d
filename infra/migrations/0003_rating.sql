-- The rating engine (issue 3): versioned outbound rates, number and one-time fees, plans with
-- included minutes, add-on minute bundles, managed accounts inheriting their manager's prices.
-- Money columns are bigint micro-units, as everywhere.

-- A price list's version is bumped by every write through metering/pricelists.py; running
-- catalogs reload only the lists whose version moved.
ALTER TABLE price_lists
    ADD COLUMN description        text   NOT NULL DEFAULT '',
    ADD COLUMN number_monthly_fee bigint NOT NULL DEFAULT 0 CHECK (number_monthly_fee >= 0),
    ADD COLUMN version            bigint NOT NULL DEFAULT 1;

-- A rate row is in force from effective_from until the next row of the same prefix: a call is
-- rated with the row in force at its answered_at. Rows before 0003 were always in force.
ALTER TABLE price_list_rates
    ADD COLUMN effective_from timestamptz NOT NULL DEFAULT '1970-01-01T00:00:00Z';
ALTER TABLE price_list_rates DROP CONSTRAINT price_list_rates_pkey;
ALTER TABLE price_list_rates ADD PRIMARY KEY (price_list_id, prefix, effective_from);

-- One-time fees by code (number setup, port-in, ...), charged by whoever bills that event.
CREATE TABLE price_list_fees (
    price_list_id text   NOT NULL REFERENCES price_lists (id) ON DELETE CASCADE,
    code          text   NOT NULL CHECK (code ~ '^[a-z0-9_]{1,32}$'),
    amount        bigint NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (price_list_id, code)
);

-- included_s: seconds of voice included per billing period (calendar month, UTC); 0 = pay as
-- you go. The period's allowance lives in Redis only (created by debit.lua at the first call
-- of the period), so it needs no row here: it follows from the plan.
CREATE TABLE plans (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    description text    NOT NULL DEFAULT '',
    included_s  integer NOT NULL DEFAULT 0 CHECK (included_s >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Add-on bundles on sale, and those bought (each one a grant of seconds in the account's bucket).
CREATE TABLE bundles (
    id            text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    description   text    NOT NULL DEFAULT '',
    seconds       integer NOT NULL CHECK (seconds > 0),
    price         bigint  NOT NULL CHECK (price >= 0),
    validity_days integer NOT NULL CHECK (validity_days > 0)
);

CREATE TABLE bundle_purchases (
    account_id  text    NOT NULL REFERENCES accounts (id),
    purchase_id text    NOT NULL CHECK (purchase_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    bundle_id   text    NOT NULL REFERENCES bundles (id),
    seconds     integer NOT NULL,
    price       bigint  NOT NULL,
    valid_from  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, purchase_id)
);

-- A managed account uses its own price list if it has one, else its manager's (one level:
-- a manager is never itself managed, see meter/accounts.py).
ALTER TABLE accounts
    ALTER COLUMN price_list_id DROP NOT NULL,
    ADD COLUMN manager_id text REFERENCES accounts (id),
    ADD COLUMN plan_id    text REFERENCES plans (id),
    ADD CONSTRAINT accounts_priced CHECK (price_list_id IS NOT NULL OR manager_id IS NOT NULL),
    ADD CONSTRAINT accounts_not_own_manager CHECK (manager_id <> id);
CREATE INDEX accounts_manager ON accounts (manager_id) WHERE manager_id IS NOT NULL;

-- Seconds drawn from included minutes / bundles by a call (its amount is the overage only).
-- A constant default: no table rewrite.
ALTER TABLE ledger ADD COLUMN included_s integer NOT NULL DEFAULT 0 CHECK (included_s >= 0);
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('opening', 'call', 'sms', 'credit', 'correction', 'bundle', 'fee'));

-- One counter for every change that can alter how an account is rated. Running catalogs poll
-- it (one tiny query every second or so, never per event) and reload what moved.
CREATE TABLE rating_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);
INSERT INTO rating_version VALUES (true, 1);

CREATE FUNCTION bump_rating_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE rating_version SET version = version + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER price_lists_rating_version AFTER INSERT OR UPDATE OR DELETE ON price_lists
    FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_version();
CREATE TRIGGER plans_rating_version AFTER INSERT OR UPDATE OR DELETE ON plans
    FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_version();
CREATE TRIGGER accounts_rating_version AFTER UPDATE OF price_list_id, manager_id, plan_id
    ON accounts FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_version();
