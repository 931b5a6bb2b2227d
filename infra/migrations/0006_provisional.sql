-- Provisional charges (docs/design/call-credit.md "The life of a reservation"): a reservation
-- whose hangup never came is charged what it held, provisionally (kind 'provisional', amount
-- < 0, ref = the call_id, event_id 'charge:<call_id>'); a late hangup is charged in full as a
-- 'call' row and gives the provisional charge back in a second 'provisional' row (amount > 0,
-- event_id 'settle:<call_id>'), so the call's rows sum to the rated call. Both rows are keyed
-- by (account, call_id): written once, whoever writes them first.
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('opening', 'call', 'sms', 'credit', 'correction', 'bundle', 'fee',
                    'provisional'));
