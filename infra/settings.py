"""Typed settings, parsed once at the edge from ``METER_*`` environment variables.

Nothing else in the project reads the environment: domain code takes values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

LOG_FORMATS: Final = ("text", "json")


@dataclass(frozen=True, slots=True)
class CallControl:
    """The reservation rules of a live call, shared by the API's authorizations and the
    metering worker's live-call extensions (``Settings.call_control``)."""

    grant_s: int = 300  # reserved ahead at each step
    grace_s: int = 60  # a reservation not closed by its end plus this is swept
    max_s: int = 14_400  # the longest call (caps free destinations)


PAYMENT_GATEWAYS: Final = ("sandbox", "stripe")

#: The most replicas ``redis_wait_replicas`` may ask for (a bound against typos: a primary
#: with more replicas than this is not a deployment here).
MAX_WAIT_REPLICAS: Final = 16


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use."""


@dataclass(frozen=True, slots=True)
class Settings:
    #: ``host:port[,host:port]``; empty = start the embedded Tansu broker.
    kafka_bootstrap: str = ""
    #: ``redis://host:port/db``, or a Redis Cluster: ``redis+cluster://host:port[,host:port]``
    #: (where to start discovering it; see ``infra.redisclient``); empty = start an embedded
    #: ``redis-server``.
    redis_url: str = ""
    #: ``postgresql://...``; empty = start an embedded PostgreSQL.
    database_url: str = ""
    #: Where embedded services keep their data and logs.
    data_dir: Path = Path(".meter")
    #: Consumer group of the metering workers: the workers of one group share the partitions.
    consumer_group: str = "meter-metering"
    #: Partitions for topics the service creates itself (embedded broker, demo, bench).
    partitions: int = 8
    #: The most records a metering worker takes into one batch.
    batch_max_records: int = 5000
    #: How long a metering worker waits for a batch to fill, in milliseconds.
    batch_timeout_ms: int = 50
    #: Larger messages are dead-lettered as ``oversized``.
    max_message_bytes: int = 65_536
    #: Longer calls (``billable_s``, or a ``call.progress``'s ``elapsed_s``) are dead-lettered
    #: as ``absurd_duration``.
    max_call_s: int = 86_400
    #: Events stamped further in the future are dead-lettered as ``future_timestamp``.
    max_clock_skew_s: int = 300
    #: The most accounts one debit script call carries (bounds how long it holds Redis). On a
    #: Redis Cluster a call carries accounts of one hash slot only, so calls carry fewer there.
    redis_accounts_per_call: int = 256
    #: The most accounts whose rating (price list, plan, billing groups) a metering worker
    #: keeps in memory (about 165 bytes each with ids of 11 characters). It reads up to this
    #: many at start, so it does not read each one from PostgreSQL at its first event; past
    #: it, the accounts read longest ago are dropped (and read again at their next event).
    catalog_max_accounts: int = 1_000_000
    #: Consumer-group session timeout; the embedded broker holds a join for about half of it.
    kafka_session_timeout_ms: int = 10_000
    #: Connect and read timeout of the workers' and ops' Redis calls, and the API's connect
    #: timeout (its reads are bounded by ``authorize_deadline_s``): a hung Redis fails a batch,
    #: never hangs it.
    redis_timeout_s: float = 5.0
    #: The metering worker's debit round trip ends with ``WAIT`` on every Redis node it wrote to
    #: (each primary of a cluster): a batch is committed only once this many replicas of each
    #: node acknowledged its debits, or fails and is replayed. Credits wait the same way in
    #: every process that makes them (payments and recharges, refunds, compensations): one not
    #: acknowledged fails, and the payment or refund stays not credited until its retry or
    #: recovery credits it, once per credit id. 0 = off (replication stays
    #: asynchronous: a failover may lose what a primary acknowledged just before it died).
    #: At most the replicas each primary has, or every batch fails (docs/design/scale-out.md).
    redis_wait_replicas: int = 0
    #: How long that ``WAIT`` waits for the replicas, in milliseconds; with ``WAIT`` on, below
    #: ``redis_timeout_s`` (which bounds every read: a longer wait would time the read out).
    redis_wait_timeout_ms: int = 100
    #: Prometheus ``/metrics`` port of every process; 0 = no endpoint.
    metrics_port: int = 0
    #: Loopback by default; ``0.0.0.0`` inside a container, so Prometheus can reach it.
    metrics_addr: str = "127.0.0.1"
    #: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``; an unknown name means ``INFO``.
    log_level: str = "INFO"
    #: ``text`` for people, ``json`` for log shippers: one object per line (``ts, level, logger,
    #: msg``, plus ``account_id``, ``call_id``, ``event_id``, ... when the line is about one;
    #: ``exc`` with the traceback).
    log_format: str = "text"
    #: ``meter run ops``: how often it samples consumer lag (cheap: a few requests per
    #: partition); 0 switches that collector off.
    ops_lag_interval_s: float = 15.0
    #: ``meter run ops``: how often it counts accounts by state, a ``SCAN`` over every Redis key
    #: (250 per step, each step holding Redis about 0.2 ms: per 100k accounts about 0.3 s of
    #: Redis time and 2 s end to end, measured here; raise it at millions); 0 = off.
    ops_accounts_interval_s: float = 60.0
    #: ``meter run ops``: how often it reconciles Redis against the ledger (a sum over the whole
    #: ledger: run it less often as the ledger grows); 0 = off.
    ops_reconcile_interval_s: float = 300.0
    #: ``meter run api``: the address the HTTP API listens on (loopback unless told otherwise).
    api_host: str = "127.0.0.1"
    #: ``meter run api``: the port the HTTP API listens on.
    api_port: int = 8080
    #: How long an API key is trusted from the API process's cache before it is re-read (in the
    #: background): a revoked key keeps working this long plus one lookup at most.
    api_key_cache_s: float = 5.0
    #: Seconds of credit a call reserves ahead, at authorization and at each live-call
    #: extension (``call.answered``, ``call.progress``). The API and the metering workers both
    #: read it, and the two below (``Settings.call_control``).
    authorize_grant_s: int = 300
    #: How long past its granted time an unclosed reservation lives before the sweep charges
    #: what it held, provisionally (docs/design/call-credit.md).
    authorize_grace_s: int = 60
    #: The longest call authorize ever allows, and live-call extension reserves for (caps free
    #: destinations).
    authorize_max_s: int = 14_400
    #: The whole authorization answers within this (the key check included), or 503
    #: ``balance_store_unavailable`` (Redis) / ``database_unavailable`` (PostgreSQL).
    authorize_deadline_s: float = 0.5
    #: ``sandbox`` (in-process, behaves like Stripe's test cards; the demo's) or ``stripe``.
    payment_gateway: str = "sandbox"
    #: Stripe's secret key (required when ``payment_gateway`` is ``stripe``).
    stripe_api_key: str = ""
    #: Another API base than api.stripe.com, for tests or a proxy; empty = Stripe's own.
    stripe_api_base: str = ""
    #: One gateway request gives up after this; the outcome is then unknown and the same
    #: idempotency key is retried (never a new charge).
    payment_timeout_s: float = 20.0
    #: Consumer group of the recharge worker (``meter run recharge``).
    recharge_group: str = "meter-recharge"
    #: Seconds to wait after the 1st, 2nd, ... decline before trying the card again,
    #: comma-separated (the last one repeats).
    recharge_backoff_s: str = "300,1800,7200"
    #: Declines in a row after which auto-recharge is turned off (``repeated_declines``).
    recharge_max_declines: int = 3
    #: How often the recharge worker retries due triggers and settles unfinished payments.
    recharge_scan_interval_s: float = 5.0
    #: ``meter run bridge``: the switch's JSON-RPC over HTTP (Kamailio's ``jsonrpcs`` on
    #: ``xhttp``, loopback only: deploy/kamailio/kamailio.cfg).
    bridge_rpc_url: str = "http://127.0.0.1:5071/RPC"
    #: ``meter run bridge``: one JSON-RPC call to the switch gives up after this (then retried).
    bridge_rpc_timeout_s: float = 2.0
    #: Consumer group of the signal bridge (``meter run bridge``): one bridge per switch.
    bridge_group: str = "meter-bridge"
    #: ``meter run billing``: how long a number stays On Hold (its renewal unpaid, or auto-pay
    #: off) before it is released; a payment or recharge meanwhile renews it (7 days).
    number_grace_s: int = 604_800
    #: ``meter run billing``: how long a renewal the credit does not cover waits for an open
    #: auto-recharge to land before the number goes On Hold.
    number_recharge_wait_s: int = 600
    #: ``meter run billing``: how often it looks for numbers with work (renewals due, holds,
    #: grace periods over); a payment renews a held number within this.
    billing_scan_interval_s: float = 30.0
    #: The service provider's name on invoices (their header and PDF).
    invoice_issuer_name: str = "Meter"
    #: A PNG or JPEG printed on every invoice PDF; empty = none.
    invoice_logo_path: str = ""
    #: ``meter run billing`` issues a month's invoices this long after it ends, so that its
    #: late events (switches catching up after an outage) are in the ledger first.
    invoice_run_delay_s: int = 21_600
    #: An invoiced account's invoice is due this many days after it is issued.
    invoice_due_days: int = 15
    #: Past due this many days, an account is suspended (origin ``past_due``) until it pays.
    past_due_suspend_days: int = 14
    #: The notice before that suspension (``invoice.past_due_warning``), this many days ahead.
    past_due_warn_days: int = 3
    #: Consumer group of the billing worker (``meter run billing``).
    billing_worker_group: str = "meter-billing"
    #: The portal's session cookie is ``Secure`` (sent over HTTPS only): set it where the API
    #: is served over TLS (or behind a proxy that terminates TLS).
    portal_secure_cookies: bool = False
    #: A portal session ends this long after sign-in (8 h), or at sign-out.
    portal_session_ttl_s: int = 28_800
    #: Consecutive wrong passwords before a user's sign-in is locked (``portal_lockout_s``).
    portal_max_failures: int = 5
    #: How long a locked sign-in stays locked (15 min); the right password does not open it.
    portal_lockout_s: int = 900

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``METER_<FIELD>`` for every field; unknown ``METER_*`` names are an error."""
        env = os.environ if env is None else env
        known = {f"METER_{f.name.upper()}": f for f in fields(cls)}
        unknown = sorted(k for k in env if k.startswith("METER_") and k not in known)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name not in env:
                continue
            raw = env[name]
            default = getattr(cls(), f.name)
            try:
                if isinstance(default, bool):
                    values[f.name] = raw.lower() in ("1", "true", "yes")
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, float):
                    values[f.name] = float(raw)
                elif isinstance(default, Path):
                    values[f.name] = Path(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise SettingsError(f"{name}={raw!r}: {exc}") from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.batch_max_records < 1:
            raise SettingsError("METER_BATCH_MAX_RECORDS must be >= 1")
        if self.max_call_s < 1:
            raise SettingsError("METER_MAX_CALL_S must be >= 1")
        if self.partitions < 1:
            raise SettingsError("METER_PARTITIONS must be >= 1")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"METER_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
        for name in ("ops_lag_interval_s", "ops_accounts_interval_s", "ops_reconcile_interval_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"METER_{name.upper()} must be >= 0 (0 = off)")
        if not 0 <= self.api_port <= 65_535:
            raise SettingsError("METER_API_PORT must be a port number (0-65535)")
        if self.authorize_deadline_s <= 0:
            raise SettingsError("METER_AUTHORIZE_DEADLINE_S must be > 0")
        if self.authorize_grant_s < 1 or self.authorize_grace_s < 0:
            raise SettingsError(
                "METER_AUTHORIZE_GRANT_S must be >= 1 and METER_AUTHORIZE_GRACE_S >= 0"
            )

        if self.payment_gateway not in PAYMENT_GATEWAYS:
            raise SettingsError(
                f"METER_PAYMENT_GATEWAY must be one of {', '.join(PAYMENT_GATEWAYS)}"
            )
        if self.payment_gateway == "stripe" and not self.stripe_api_key:
            raise SettingsError(
                "METER_STRIPE_API_KEY is required with METER_PAYMENT_GATEWAY=stripe"
            )
        if self.payment_timeout_s <= 0 or self.recharge_scan_interval_s <= 0:
            raise SettingsError(
                "METER_PAYMENT_TIMEOUT_S and METER_RECHARGE_SCAN_INTERVAL_S must be > 0"
            )
        if self.number_grace_s < 0 or self.number_recharge_wait_s < 0:
            raise SettingsError(
                "METER_NUMBER_GRACE_S and METER_NUMBER_RECHARGE_WAIT_S must be >= 0"
            )
        if not 0 <= self.past_due_warn_days <= self.past_due_suspend_days:
            raise SettingsError(
                "METER_PAST_DUE_WARN_DAYS must be between 0 and METER_PAST_DUE_SUSPEND_DAYS"
            )
        if self.invoice_due_days < 0 or self.invoice_run_delay_s < 0:
            raise SettingsError("METER_INVOICE_DUE_DAYS and METER_INVOICE_RUN_DELAY_S must be >= 0")
        if self.billing_scan_interval_s <= 0:
            raise SettingsError("METER_BILLING_SCAN_INTERVAL_S must be > 0")
        if self.recharge_max_declines < 1:
            raise SettingsError("METER_RECHARGE_MAX_DECLINES must be >= 1")
        self.backoff()
        if self.redis_accounts_per_call < 1:
            raise SettingsError("METER_REDIS_ACCOUNTS_PER_CALL must be >= 1")
        if self.catalog_max_accounts < 1:
            raise SettingsError("METER_CATALOG_MAX_ACCOUNTS must be >= 1")
        if not 0 <= self.redis_wait_replicas <= MAX_WAIT_REPLICAS:
            raise SettingsError(
                f"METER_REDIS_WAIT_REPLICAS must be between 0 (off) and {MAX_WAIT_REPLICAS}"
            )
        if self.redis_wait_timeout_ms < 1:
            raise SettingsError("METER_REDIS_WAIT_TIMEOUT_MS must be >= 1")
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= self.redis_timeout_s * 1000:
            raise SettingsError(
                "METER_REDIS_WAIT_TIMEOUT_MS must be below METER_REDIS_TIMEOUT_S"
                f" ({self.redis_timeout_s} s) when METER_REDIS_WAIT_REPLICAS is set"
            )
        from infra.redisclient import cluster_nodes, is_cluster_url  # redis-py: only if needed

        if is_cluster_url(self.redis_url):
            try:
                cluster_nodes(self.redis_url)
            except ValueError as exc:
                raise SettingsError(f"METER_REDIS_URL: {exc}") from None

    def call_control(self) -> CallControl:
        """The reservation rules of a live call, from ``authorize_grant_s``, ``_grace_s`` and
        ``_max_s``: the API's authorizations and the metering worker's extensions must reserve
        and sweep by the same ones, so both take them from here."""
        return CallControl(
            grant_s=self.authorize_grant_s,
            grace_s=self.authorize_grace_s,
            max_s=self.authorize_max_s,
        )

    def invoice_rules(self) -> tuple[int, int, int]:
        """``(invoice_due_days, past_due_suspend_days, past_due_warn_days)``."""
        return self.invoice_due_days, self.past_due_suspend_days, self.past_due_warn_days

    def backoff(self) -> tuple[float, ...]:
        """``recharge_backoff_s`` as seconds, one per decline (the last repeats)."""
        try:
            steps = tuple(float(s) for s in self.recharge_backoff_s.split(","))
        except ValueError:
            steps = ()
        if not steps or any(s < 0 for s in steps):
            raise SettingsError(
                "METER_RECHARGE_BACKOFF_S must be comma-separated seconds >= 0, e.g. 300,1800"
            )
        return steps

    def with_endpoints(self, kafka: str, redis: str, database: str) -> Settings:
        return replace(self, kafka_bootstrap=kafka, redis_url=redis, database_url=database)
