-- Billing groups (docs/design/billing-groups.md): an account's way of dividing its costs (a
-- branch, a department, a client; the contact center's "billing units" are the same thing).
-- Every charge records its group when it is rated, in ledger.billing_group_id, and never
-- after: assigning a number to another group later does not rewrite history.
CREATE TABLE billing_groups (
    account_id  text NOT NULL REFERENCES accounts (id),
    id          text NOT NULL CHECK (id ~ '^bg_[a-z0-9]{16}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, id),
    UNIQUE (account_id, name)
);

-- Outbound profiles (call events carry outbound_profile_id): an outbound call through a
-- profile with a group is that group's.
CREATE TABLE outbound_profiles (
    account_id        text NOT NULL REFERENCES accounts (id),
    id                text NOT NULL CHECK (id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    name              text NOT NULL DEFAULT '' CHECK (length(name) <= 100),
    billing_group_id  text,
    PRIMARY KEY (account_id, id),
    FOREIGN KEY (account_id, billing_group_id) REFERENCES billing_groups (account_id, id)
);

-- Which group each of an account's numbers is in (at most one), and users in billing units
-- (any number of them: they see those units' usage with View Billing unit).
CREATE TABLE number_groups (
    account_id        text NOT NULL REFERENCES accounts (id),
    number            text NOT NULL CHECK (number ~ '^\+[1-9][0-9]{1,14}$'),
    billing_group_id  text NOT NULL,
    PRIMARY KEY (account_id, number),
    FOREIGN KEY (account_id, billing_group_id) REFERENCES billing_groups (account_id, id)
);
CREATE TABLE billing_group_users (
    account_id        text NOT NULL,
    billing_group_id  text NOT NULL,
    user_id           text NOT NULL REFERENCES users (id),
    PRIMARY KEY (account_id, billing_group_id, user_id),
    FOREIGN KEY (account_id, billing_group_id) REFERENCES billing_groups (account_id, id)
        ON DELETE CASCADE
);

-- '' for a charge in no group; direction 'inbound' / 'outbound' for a call, '' otherwise (the
-- month's report splits minutes by it). Column defaults: existing rows get them without a
-- rewrite of the table.
ALTER TABLE ledger ADD COLUMN billing_group_id text NOT NULL DEFAULT '';
ALTER TABLE ledger ADD COLUMN direction text NOT NULL DEFAULT ''
    CHECK (direction IN ('', 'inbound', 'outbound'));

-- The rating catalog caches each account's assignments: a change makes it read them again.
CREATE TRIGGER billing_groups_rating_version AFTER INSERT OR DELETE
    ON billing_groups FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_version();
CREATE TRIGGER outbound_profiles_rating_version AFTER INSERT OR UPDATE OR DELETE
    ON outbound_profiles FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_version();
CREATE TRIGGER number_groups_rating_version AFTER INSERT OR UPDATE OR DELETE
    ON number_groups FOR EACH STATEMENT EXECUTE FUNCTION bump_rating_version();
