-- The usage history (GET /v1/accounts/{id}/usage) shows who called whom: a call's and a
-- message's from and to, a number fee's number (in to_party), '' for other rows. Recorded at
-- rating with the charge, as the billing group is. Column defaults: no rewrite of the table.
ALTER TABLE ledger ADD COLUMN from_party text NOT NULL DEFAULT '';
ALTER TABLE ledger ADD COLUMN to_party text NOT NULL DEFAULT '';
