"""Auto-recharge, top-ups and payments."""
