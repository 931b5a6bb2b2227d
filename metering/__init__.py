"""The usage stream processor (the hot path) and its worker."""
