-- Late charges (docs/design/invoices.md "Late charges"): a charge of a month that reaches the
-- ledger after that month's invoice was issued goes on the account's next invoice, as a line
-- naming the month it belongs to. late_for is that month ('YYYY-MM'), or '' for a line of the
-- invoice's own month and for the lines the invoice itself charges (DIDs, extensions). What a
-- month's lines sum to over all invoices is what has been invoiced of it: the next run adds
-- the difference from the ledger, so a charge is invoiced once, however late it came.
ALTER TABLE invoice_lines
    ADD COLUMN late_for text NOT NULL DEFAULT ''
        CHECK (late_for = '' OR late_for ~ '^[0-9]{4}-(0[1-9]|1[0-2])$');
