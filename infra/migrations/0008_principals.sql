-- Who may do what (docs/design/access.md). People are users: the platform's operators (no
-- account: they act on every account) and the admins and users of one account. Access groups of
-- an account give its users privileges on top of their role (the seeds' Edit Billing, View
-- Billing unit, Edit Billing unit). An API key belongs to a user (it acts as that user, with
-- the user's role and privileges as they are now, so demoting or disabling a user changes
-- its keys at once), to a service (switches, call-control), or, as keys made before users
-- existed, to an account with a role of its own.
CREATE TABLE users (
    id          text PRIMARY KEY CHECK (id ~ '^usr_[a-z0-9]{16}$'),
    account_id  text REFERENCES accounts (id),
    email       text NOT NULL UNIQUE CHECK (email = lower(email) AND email ~ '^[^@\s]{1,64}@[^@\s]{1,255}$'),
    name        text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    role        text NOT NULL CHECK (role IN ('operator', 'admin', 'user')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz,
    CHECK ((role = 'operator') = (account_id IS NULL))
);
CREATE INDEX users_account ON users (account_id);

CREATE TABLE access_groups (
    id          text PRIMARY KEY CHECK (id ~ '^grp_[a-z0-9]{16}$'),
    account_id  text NOT NULL REFERENCES accounts (id),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    privileges  text[] NOT NULL DEFAULT '{}'
        CHECK (privileges <@ ARRAY['edit_billing', 'view_billing_unit', 'edit_billing_unit']),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, name)
);

CREATE TABLE access_group_members (
    group_id    text NOT NULL REFERENCES access_groups (id) ON DELETE CASCADE,
    user_id     text NOT NULL REFERENCES users (id),
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX access_group_members_user ON access_group_members (user_id);

ALTER TABLE api_keys ALTER COLUMN account_id DROP NOT NULL;
ALTER TABLE api_keys ADD COLUMN user_id text REFERENCES users (id);
ALTER TABLE api_keys ADD COLUMN label text NOT NULL DEFAULT '' CHECK (length(label) <= 100);
ALTER TABLE api_keys DROP CONSTRAINT api_keys_role_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check
    CHECK (role IN ('operator', 'admin', 'user', 'service'));
-- an operator's key has no account; every other key has one
ALTER TABLE api_keys ADD CONSTRAINT api_keys_operator_check
    CHECK ((role = 'operator') = (account_id IS NULL));
CREATE INDEX api_keys_user ON api_keys (user_id);

-- A manager account may create managed accounts (seed 003): the operator turns it on. Accounts
-- that already manage some are managers.
ALTER TABLE accounts ADD COLUMN is_manager boolean NOT NULL DEFAULT false;
UPDATE accounts SET is_manager = true
    WHERE id IN (SELECT manager_id FROM accounts WHERE manager_id IS NOT NULL);
