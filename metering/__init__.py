"""Rating and the usage stream processor (the hot path)."""
