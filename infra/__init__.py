"""Plumbing every room stands on: settings, the clock, connections, the database and its
migrations, the ledger store, metrics, logs and the embedded services."""
