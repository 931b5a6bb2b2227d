"""The balance store: account state in Redis, its Lua scripts and key layout, accounts' provisioning
and restore from the book of record."""
