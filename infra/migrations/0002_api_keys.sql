-- API keys of the HTTP API. Only the SHA-256 of a key is stored, never the key: a key carries
-- 256 random bits, so an unsalted fast hash is enough (nothing to brute-force), and a lookup by
-- hash needs no per-key salt. A key belongs to one account and has one role:
--   admin    billing and operator actions on its own account
--   user     reads and call authorization on its own account
--   service  call-control: authorizes calls for any account
CREATE TABLE api_keys (
    key_id      text PRIMARY KEY CHECK (key_id ~ '^[a-z0-9]{16}$'),
    key_hash    bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    account_id  text NOT NULL REFERENCES accounts (id),
    role        text NOT NULL CHECK (role IN ('admin', 'user', 'service')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id);
