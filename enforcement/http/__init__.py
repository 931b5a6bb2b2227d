"""The HTTP API of call control and account administration."""
