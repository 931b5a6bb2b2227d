"""The recharge worker (``meter run recharge``), hosted in faust-streaming.

Low volume, so a faust agent per message is the right tool here (the hot path is not): it reads
``billing.recharge-requests``, and a faust timer runs ``PaymentService.recover`` every few
seconds (retries after a back-off, charges whose outcome was unknown, credits a crash cut off).

Delivery is at least once: an offset is committed after ``on_trigger`` returns, and a trigger
redelivered after a crash finds its row and the payment it started, and charges nothing new
(the payment keeps the gateway's idempotency key it was first charged with). While PostgreSQL
or Redis is down the agent retries the same trigger, holding its partition: losing a trigger
would leave the account's latch set and no recharge ever again.

faust pins an event loop when an App is created, so the App, the connections and the
service are all made inside ``run_recharge_worker``, in the process that runs them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from balance.store import RedisBalances
from contracts import topics
from contracts.payments import Notification, RechargeRequested
from infra.db import create_pool
from infra.redisclient import redis_client, warm_up
from infra.settings import Settings
from recharge.gateway import PaymentGateway
from recharge.service import PaymentService

log = logging.getLogger(__name__)

#: Waits between retries of a trigger that failed on an outage (the last repeats).
_OUTAGE_BACKOFF = (0.5, 1.0, 2.0, 5.0)


def make_gateway(settings: Settings) -> PaymentGateway:
    if settings.payment_gateway == "stripe":
        import stripe

        from recharge.stripe_gateway import StripeGateway

        # stripe-python otherwise writes an id under ~/.config/stripe and sends it with every
        # request: a service process has no business with either.
        stripe.enable_telemetry = False

        return StripeGateway(
            settings.stripe_api_key,
            api_base=settings.stripe_api_base or None,
            timeout_s=settings.payment_timeout_s,
        )
    from recharge.sandbox import SandboxGateway

    return SandboxGateway()


@dataclass
class _Running:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    service: PaymentService | None = None


def build_app(settings: Settings) -> Any:
    """The faust App of the recharge worker (untyped: faust ships no type information)."""
    import faust

    brokers = [f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",") if b.strip()]
    app = faust.App(
        settings.recharge_group,
        broker=brokers,
        # faust's own files (its default is ./<app id>-data, wherever the process was started)
        datadir=str(settings.data_dir / "faust"),
        web_enabled=False,
        store="memory://",
        topic_disable_leader=True,
        topic_allow_declare=False,  # the topics are the deployment's (infra.stack.prepare)
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
        broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_ms / 4000),
        stream_wait_empty=False,
    )
    # raw bytes both ways: pydantic (contracts.payments) is the one parser of our events
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    requests = app.topic(topics.RECHARGE_REQUESTS, **raw)
    notifications = app.topic(topics.NOTIFICATIONS, **raw)
    running = _Running()

    class TopicNotifier:
        async def notify(self, n: Notification) -> None:
            await notifications.send(key=n.subject.encode(), value=n.model_dump_json().encode())

    @app.task  # type: ignore[untyped-decorator]
    async def connect() -> None:
        pool = await create_pool(settings.database_url, max_size=4)
        # One node or a cluster, by the URL; the one retry policy (infra.redisclient).
        r = redis_client(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            measured=False,
        )
        await warm_up(r)
        gateway = make_gateway(settings)
        running.service = PaymentService(
            pool,
            RedisBalances(
                r,
                wait_replicas=settings.redis_wait_replicas,  # a recharge's credit waits too
                wait_timeout_ms=settings.redis_wait_timeout_ms,
            ),
            gateway,
            TopicNotifier(),
            backoff_s=settings.backoff(),
            max_declines=settings.recharge_max_declines,
            charge_timeout_s=settings.payment_timeout_s,
        )
        running.ready.set()
        log.info("recharge worker ready (gateway %s)", gateway.name)

    @app.agent(requests)
    async def triggers(stream: Any) -> None:
        async for value in stream:
            await running.ready.wait()
            assert running.service is not None
            try:
                req = RechargeRequested.model_validate_json(value)
            except ValidationError as exc:
                log.error("unreadable recharge request skipped: %s", exc.errors()[:1])
                continue
            tries = 0
            while True:
                try:
                    outcome = await running.service.on_trigger(req.data.account_id, req.data.seq)
                    log.info(
                        "recharge trigger %s/%d: %s", req.data.account_id, req.data.seq, outcome
                    )
                    break
                except Exception:
                    wait = _OUTAGE_BACKOFF[min(tries, len(_OUTAGE_BACKOFF) - 1)]
                    log.exception("recharge trigger failed; retrying in %ss", wait)
                    tries += 1
                    await asyncio.sleep(wait)

    @app.timer(interval=settings.recharge_scan_interval_s)  # type: ignore[untyped-decorator]
    async def scan() -> None:
        if not running.ready.is_set():
            return
        assert running.service is not None
        try:
            n = await running.service.recover()
            if n:
                log.info("recharge scan worked on %d payment(s)/trigger(s)", n)
        except Exception:
            log.exception(
                "recharge scan failed; next one in %ss", settings.recharge_scan_interval_s
            )

    return app


def run_recharge_worker(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM. Blocking: faust's Worker owns the event loop (connections
    close with the process)."""
    import faust

    app = build_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
