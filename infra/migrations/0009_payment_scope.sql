-- A payment id is the client's idempotency key, and a client's keys are its own: keyed by id
-- alone, an account's top-up collided with any other account's payment of the same id, which
-- told it that id was taken and let it squat ids another account would send. Payments are keyed
-- by (account_id, id), as bundle purchases are (0003). Nothing references payments (id): no
-- foreign key or index moves with it, and the id's CHECK stays as it was.
ALTER TABLE payments DROP CONSTRAINT payments_pkey;
ALTER TABLE payments ADD CONSTRAINT payments_pkey PRIMARY KEY (account_id, id);

-- The key the gateway was charged with, kept with the payment because it is no longer its id:
-- two accounts' payments of one id must be two charges, so new payments send
-- '<account_id>/<id>' (recharge.gateway.idempotency_key; '/' is in neither id's alphabet, so no
-- two pairs give one key, and no such key is a bare id). Payments made before were charged with
-- their bare id, and one still pending is retried for up to a day: it keeps that key, or the
-- retry would be a second charge. Unique, so no two payments can ever share a gateway charge.
ALTER TABLE payments ADD COLUMN gateway_key text;
UPDATE payments SET gateway_key = id;
ALTER TABLE payments
    ALTER COLUMN gateway_key SET NOT NULL,
    ADD CONSTRAINT payments_gateway_key_key UNIQUE (gateway_key),
    ADD CONSTRAINT payments_gateway_key_check
        CHECK (gateway_key = account_id || '/' || id OR gateway_key = id);
