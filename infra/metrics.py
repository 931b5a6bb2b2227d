"""Prometheus metrics of every process, named by convention (``meter_*``, base units).

Every metric the dashboards and alert rules in ``deploy/`` read is defined here, including the
ones of processes that come later (authorize, recharge): their names are the contract with
operations. Counters whose label values are known in advance are created at zero on import, so
``increase()`` sees the first event and a quiet counter is told apart from a missing one.

Who sets what: the metering worker the ``meter_events_*``, ``meter_dead_letters_*``,
``meter_signals_*`` and ``meter_batch_*`` series; ``meter run ops`` (``ops.collector``) the consumer
lag, the accounts by state and the reconciliation drift; every process that talks to Redis or
PostgreSQL through ``infra.instrument`` the call latencies.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client import Counter, Gauge, Histogram

from contracts.signals import SIGNAL_TYPES

EVENTS_CONSUMED: Final = Counter(
    "meter_events_consumed_total", "Records taken from inbound topics", ["topic"]
)
EVENTS_CHARGED: Final = Counter(
    "meter_events_charged_total", "Events newly charged to a balance", ["type"]
)
EVENTS_DUPLICATE: Final = Counter(
    "meter_events_duplicate_total", "Events already charged (redelivery, re-publish)", ["type"]
)
EVENTS_ACKNOWLEDGED: Final = Counter(
    "meter_events_acknowledged_total",
    "Valid events taken that charge nothing (number.deactivated)",
    ["type"],
)
CALL_UPDATES: Final = Counter(
    "meter_call_updates_total",
    "Live-call updates (call.answered, call.progress) applied to reservations",
    ["type"],
)
DEAD_LETTERS: Final = Counter(
    "meter_dead_letters_total",
    "Events sent to the dead-letter topic, by reason and event type (unknown when unreadable)",
    ["reason", "type"],
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
RECONCILE_UNSETTLED: Final = Gauge(
    "meter_reconcile_unsettled_accounts",
    "Accounts still moving at every re-read of the last reconciliation (busy, not drift)",
)
RECONCILE_MISSING: Final = Gauge(
    "meter_reconcile_missing_accounts",
    "Accounts the ledger has and Redis does not at the last reconciliation (not rebuilt yet:"
    " rebuilt on their next event or authorization; not drift)",
)
RECONCILE_DOUBLE_CHARGED: Final = Gauge(
    "meter_reconcile_provisional_double_charged_calls",
    "Calls charged provisionally by the sweep and in full by their hangup, at the last"
    " reconciliation (Redis lost the marker that settles them; see the runbook)",
)

# --- Kafka, Redis, PostgreSQL ------------------------------------------------------------------

CONSUMER_LAG: Final = Gauge(
    "meter_consumer_lag_records",
    "Records not yet committed by a consumer group, per partition (clamped at 0)",
    ["group", "topic", "partition"],
)
_CALL_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
)  # fmt: skip
REDIS_SECONDS: Final = Histogram(
    "meter_redis_command_duration_seconds",
    "Round trip of one Redis command or pipeline, as the client sees it",
    ["command"],
    buckets=_CALL_BUCKETS,
)
POSTGRES_SECONDS: Final = Histogram(
    "meter_postgres_query_duration_seconds",
    "Round trip of one PostgreSQL statement, as the client sees it, by its first keyword",
    ["op"],
    buckets=_CALL_BUCKETS,
)

# --- Authorization (call-control asks before connecting a call) --------------------------------

#: The contract's deny reasons; an allowed call is counted with reason ``ok``.
AUTHORIZE_DENY_REASONS: Final = (
    "insufficient_credit",
    "account_on_hold",
    "account_suspended",
    "unknown_account",
    "no_rate_for_destination",
    "concurrent_call_limit",
)
AUTHORIZE_SECONDS: Final = Histogram(
    "meter_authorize_duration_seconds",
    "Time to answer one authorization request (the budget is 2 ms at p99)",
    # Dense around the 2 ms budget, so the p99 is interpolated inside narrow buckets there.
    buckets=(
        0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003,
        0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1,
    ),
)  # fmt: skip
AUTHORIZE_DECISIONS: Final = Counter(
    "meter_authorize_decisions_total",
    "Authorization answers, by decision and reason",
    ["decision", "reason"],
)
RESERVATIONS_LIVE: Final = Gauge(
    "meter_reservations_live",
    "Credit reservations held in Redis for connected calls, not yet closed (a global count)",
)

# --- Accounts and recharges --------------------------------------------------------------------

ACCOUNTS: Final = Gauge(
    "meter_accounts", "Accounts by state in Redis, at the last count", ["state"]
)
#: How a recharge attempt ended: the card was charged, refused, failed (gateway error or
#: timeout: the outcome is resolved later), or no attempt was made because a cap was hit.
RECHARGE_OUTCOMES: Final = ("succeeded", "declined", "failed", "capped")
#: The caps of auto-recharge: 10 charges per rolling 24 h, a new account's daily limit.
RECHARGE_CAPS: Final = ("rolling_24h_count", "new_account_daily_amount")
RECHARGES: Final = Counter(
    "meter_recharges_total", "Auto-recharge attempts, by outcome", ["outcome"]
)
RECHARGE_TRIGGERS: Final = Counter(
    "meter_recharge_triggers_total",
    "Auto-recharge triggers published (available credit crossed the threshold)",
)
RECHARGE_CAP_HITS: Final = Counter(
    "meter_recharge_cap_hits_total", "Recharges not attempted because a cap was reached", ["cap"]
)

# --- The ops collector itself (``meter run ops``) ----------------------------------------------

OPS_LAST_SUCCESS: Final = Gauge(
    "meter_ops_last_success_timestamp_seconds",
    "When each ops collector last succeeded (its start time until then)",
    ["collector"],
)
OPS_INTERVAL: Final = Gauge(
    "meter_ops_interval_seconds", "Configured period of each ops collector", ["collector"]
)
OPS_DURATION: Final = Gauge(
    "meter_ops_collect_duration_seconds", "How long each collector's last run took", ["collector"]
)
OPS_ERRORS: Final = Counter(
    "meter_ops_errors_total", "Ops collector runs that failed", ["collector"]
)

#: Dead-letter reasons of the metering path (docs/integration.md), created at zero.
DEAD_LETTER_REASONS: Final = (
    "not_json",
    "schema",
    "unsupported_type",
    "wrong_topic",
    "key_mismatch",
    "future_timestamp",
    "timestamp_out_of_range",
    "invalid_text",
    "unprocessable",
    "negative_duration",
    "absurd_duration",
    "unknown_account",
    "no_rate_for_destination",
    "duplicate_id_different_payload",
    "oversized",
    "bad_period",
)


def _at_zero(counter: Counter, label_values: Iterable[tuple[str, ...]]) -> None:
    for values in label_values:
        counter.labels(*values)


_at_zero(DEAD_LETTERS, ((r, "unknown") for r in DEAD_LETTER_REASONS))
_at_zero(SIGNALS_PUBLISHED, ((t,) for t in SIGNAL_TYPES))
_at_zero(AUTHORIZE_DECISIONS, [("allow", "ok"), *(("deny", r) for r in AUTHORIZE_DENY_REASONS)])
_at_zero(RECHARGES, ((o,) for o in RECHARGE_OUTCOMES))
_at_zero(RECHARGE_CAP_HITS, ((c,) for c in RECHARGE_CAPS))

#: What the sweep did with a reservation whose call was never closed (hangup lost).
SWEEP_OUTCOMES: Final = ("provisional", "released")
RESERVATIONS_SWEPT: Final = Counter(
    "meter_reservations_swept_total",
    "Reservations closed by the sweep because their call was never closed (hangup lost), by"
    " outcome: provisional (charged what they held, until a late hangup settles them) or"
    " released (they held nothing)",
    ["outcome"],
)
_at_zero(RESERVATIONS_SWEPT, ((o,) for o in SWEEP_OUTCOMES))

#: ``POST /v1/events`` (the API): events acknowledged by the broker, and requests refused.
INGEST_OUTCOMES: Final = ("accepted", "refused", "broker_unavailable")
EVENTS_INGESTED: Final = Counter(
    "meter_events_ingested_total",
    "POST /v1/events: events produced and acknowledged (accepted), requests refused as bad"
    " (refused) or not taken by the broker (broker_unavailable)",
    ["outcome"],
)
_at_zero(EVENTS_INGESTED, ((o,) for o in INGEST_OUTCOMES))

#: ``meter run bridge``: control signals enforced on the switch, by type and outcome.
BRIDGE_OUTCOMES: Final = ("applied", "stale", "ignored", "scheduled", "failed")
BRIDGE_SIGNALS: Final = Counter(
    "meter_bridge_signals_total",
    "Control signals the signal bridge handled, by type and outcome: applied on the switch,"
    " stale (seq at or below the last applied: a repeat), ignored (a type with nothing to do),"
    " scheduled (a call.terminate for later), failed (the switch refused; retried)",
    ["type", "outcome"],
)
BRIDGE_LAG: Final = Gauge(
    "meter_bridge_lag_seconds",
    "Age of the oldest control signal the signal bridge has not enforced yet (0 when idle):"
    " grows while the switch's JSON-RPC does not answer",
)
BRIDGE_RPC_ERRORS: Final = Counter(
    "meter_bridge_rpc_errors_total", "Failed JSON-RPC calls to the switch (each is retried)"
)

#: ``meter run billing`` (and the API's releases): what each step of a number's life did.
NUMBER_OUTCOMES: Final = (
    "renewed", "waiting", "held", "released", "current", "ignored", "activated", "deactivated",
    "failed",
)
NUMBER_STEPS: Final = Counter(
    "meter_number_steps_total",
    "Steps of the numbers' life, by outcome: renewed (a month charged), waiting (for a"
    " recharge, or a month not started), held (number.hold), released (number.release),"
    " current (nothing due), ignored (unknown account or number, a repeat), activated and"
    " deactivated (inventory's events), failed (retried by the next tick)",
    ["outcome"],
)
_at_zero(NUMBER_STEPS, ((o,) for o in NUMBER_OUTCOMES))

#: ``meter run billing`` and the API: what each step of a subscription did.
SUBSCRIPTION_OUTCOMES: Final = (
    "begun", "current", "ignored", "failed", "subscribed", "upgraded", "downgrade_scheduled",
    "unchanged",
)
SUBSCRIPTION_STEPS: Final = Counter(
    "meter_subscription_steps_total",
    "Steps of the subscriptions, by outcome: begun (a period's fee taken and its allowance"
    " given), current (begun already), ignored (no balance state), failed (retried by the next"
    " tick), subscribed, upgraded, downgrade_scheduled, unchanged",
    ["outcome"],
)
_at_zero(SUBSCRIPTION_STEPS, ((o,) for o in SUBSCRIPTION_OUTCOMES))

#: ``meter run billing`` and ``meter invoices run``: what issuing each account's invoice did.
INVOICE_OUTCOMES: Final = ("issued", "current", "ignored", "failed")
INVOICE_STEPS: Final = Counter(
    "meter_invoices_total",
    "Invoices of the monthly run, by outcome: issued, current (the account had its invoice),"
    " ignored (no such account), failed (retried by the next run)",
    ["outcome"],
)
_at_zero(INVOICE_STEPS, ((o,) for o in INVOICE_OUTCOMES))
