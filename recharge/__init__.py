"""Auto-recharge and top-up policy (issue: auto-recharge and top-ups within the caps)."""
