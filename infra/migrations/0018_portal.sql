-- The web portal's sign-in (docs/design/portal.md; the one writer: portal/sessions.py).
--
-- user_passwords: a user's argon2id hash (never the password), and its sign-in lockout:
-- failures counts wrong passwords in a row (reset by a right one, or by a new password);
-- locked_until, when set in the future, refuses every sign-in of the user, right or wrong.
CREATE TABLE user_passwords (
    user_id       text PRIMARY KEY REFERENCES users (id),
    hash          text NOT NULL CHECK (hash LIKE '$argon2id$%' AND length(hash) <= 200),
    set_at        timestamptz NOT NULL,
    failures      integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    locked_until  timestamptz
);

-- A signed-in browser: only the SHA-256 of the cookie's token is kept. csrf: the token every
-- form of the session carries. Ended at sign-out (ended_at) or at expires_at.
CREATE TABLE portal_sessions (
    token_hash  bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    user_id     text NOT NULL REFERENCES users (id),
    csrf        text NOT NULL CHECK (length(csrf) BETWEEN 32 AND 100),
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    ended_at    timestamptz
);
CREATE INDEX portal_sessions_user ON portal_sessions (user_id);
