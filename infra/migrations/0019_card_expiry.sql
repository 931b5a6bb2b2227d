-- The saved card's expiry (docs/design/payments.md), as the gateway reports it
-- (Stripe: PaymentMethod.card.exp_month / exp_year). 0 / 0: not known (methods saved before
-- this migration, or a gateway that does not say). The one writer: recharge/store.py.
ALTER TABLE payment_methods
    ADD COLUMN exp_month smallint NOT NULL DEFAULT 0 CHECK (exp_month BETWEEN 0 AND 12),
    ADD COLUMN exp_year  smallint NOT NULL DEFAULT 0
        CHECK (exp_year = 0 OR exp_year BETWEEN 2000 AND 2199),
    ADD CONSTRAINT payment_methods_expiry_whole CHECK ((exp_month = 0) = (exp_year = 0));
