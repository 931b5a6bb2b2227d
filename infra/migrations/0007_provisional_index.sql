-- Provisional charges are few (calls whose hangup never came): a partial index finds them,
-- for a rebuild that puts their markers back and for the reconciliation that looks for a call
-- charged both provisionally and in full (docs/design/call-credit.md).
CREATE INDEX ledger_provisional ON ledger (account_id, ref) WHERE kind = 'provisional';
