"""What no single worker sees: reconciliation and the ops collector for Prometheus."""
