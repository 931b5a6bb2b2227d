"""Prometheus metrics of every process, named by convention (``meter_*``, base units)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED: Final = Counter(
    "meter_events_consumed_total", "Records taken from inbound topics", ["topic"]
)
EVENTS_CHARGED: Final = Counter(
    "meter_events_charged_total", "Events newly charged to a balance", ["type"]
)
EVENTS_DUPLICATE: Final = Counter(
    "meter_events_duplicate_total", "Events already charged (redelivery, re-publish)", ["type"]
)
EVENTS_IGNORED: Final = Counter(
    "meter_events_ignored_total", "Valid events the metering path does not charge", ["type"]
)
DEAD_LETTERS: Final = Counter(
    "meter_dead_letters_total", "Events sent to the dead-letter topic", ["reason"]
)
SIGNALS_PUBLISHED: Final = Counter(
    "meter_signals_published_total", "Control signals published to telephony", ["type"]
)
CHARGED_MICROS: Final = Counter(
    "meter_charged_micros_total", "Money charged, in micro-units of the account currency"
)
REDIS_DEDUP_MISSES: Final = Counter(
    "meter_redis_dedup_misses_total",
    "Events Redis applied although the ledger had them (Redis lost its memory); compensated",
)
ACCOUNTS_REBUILT: Final = Counter(
    "meter_accounts_rebuilt_total", "Accounts whose Redis state was rebuilt from the ledger"
)
BATCH_SIZE: Final = Histogram(
    "meter_batch_records",
    "Records per processed batch",
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000),
)
BATCH_SECONDS: Final = Histogram(
    "meter_batch_duration_seconds",
    "Time to process and commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
STAGE_SECONDS: Final = Histogram(
    "meter_batch_stage_duration_seconds",
    "Time per stage of a batch",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
RECONCILE_DRIFT: Final = Gauge(
    "meter_reconcile_drift_micros",
    "Sum over accounts of |Redis balance - ledger balance| at the last reconciliation",
)
RECONCILE_DRIFT_ACCOUNTS: Final = Gauge(
    "meter_reconcile_drift_accounts", "Accounts whose Redis balance differs from the ledger"
)
