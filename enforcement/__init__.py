"""The balance store (Redis Lua), account states and the signals they publish."""
