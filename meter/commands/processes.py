"""``meter run``: the service's long-running processes, each until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from infra.settings import Settings


def run_process(settings: Settings, process: str) -> int:
    """Run ``process`` (one of ``meter run``'s choices) to its end; its exit code."""
    if process == "ops":
        return asyncio.run(_run_ops(settings))
    if process == "recharge":
        return _run_recharge(settings)
    if process == "api":
        return asyncio.run(_run_api(settings))
    if process == "bridge":
        return asyncio.run(_run_bridge(settings))
    if process == "billing":
        return asyncio.run(_run_billing(settings))
    return asyncio.run(_run_metering(settings))


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


def _serve_metrics(settings: Settings) -> None:
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.metrics_addr)


async def _run_metering(settings: Settings) -> int:
    from infra.stack import running_stack
    from metering.worker import run_metering

    _serve_metrics(settings)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with running_stack(settings) as resolved:
        logging.getLogger("meter").info(
            "metering: kafka=%s redis=%s", resolved.kafka_bootstrap, resolved.redis_url
        )
        await run_metering(resolved, stop)
    return 0


def _missing_endpoints(settings: Settings) -> list[str]:
    return [
        name
        for name, value in (
            ("METER_KAFKA_BOOTSTRAP", settings.kafka_bootstrap),
            ("METER_REDIS_URL", settings.redis_url),
            ("METER_DATABASE_URL", settings.database_url),
        )
        if not value
    ]


async def _run_ops(settings: Settings) -> int:
    from ops.collector import running_collector

    missing = _missing_endpoints(settings)
    if missing:
        # Embedded services would be this process's own, empty ones: nothing to watch there.
        print(f"meter: run ops watches running services; set {', '.join(missing)}", file=sys.stderr)
        return 2
    log = logging.getLogger("meter")
    if not settings.metrics_port:
        log.warning("ops: METER_METRICS_PORT is 0, so nobody can read what it collects")
    _serve_metrics(settings)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with running_collector(settings) as collector:
        log.info(
            "ops: lag every %ss, accounts every %ss, reconcile every %ss (0 = off)",
            settings.ops_lag_interval_s,
            settings.ops_accounts_interval_s,
            settings.ops_reconcile_interval_s,
        )
        await collector.run(stop)
    return 0


def _run_recharge(settings: Settings) -> int:
    missing = _missing_endpoints(settings)
    if missing:
        # faust owns this process's event loop, so it cannot also host the embedded services:
        # `meter demo` starts them and runs this worker beside them.
        print(f"meter: run recharge needs {', '.join(missing)}", file=sys.stderr)
        return 2
    from recharge.worker import run_recharge_worker

    _serve_metrics(settings)
    return run_recharge_worker(settings)


async def _run_api(settings: Settings) -> int:
    from meter.apiserver import serve_api

    _serve_metrics(settings)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    return await serve_api(settings, stop)


async def _run_bridge(settings: Settings) -> int:
    if not settings.kafka_bootstrap:
        # An embedded broker would be this process's own, empty one: no signals there.
        print(
            "meter: run bridge reads the service's broker: set METER_KAFKA_BOOTSTRAP",
            file=sys.stderr,
        )
        return 2
    from bridge.worker import run_bridge

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per JSON-RPC call otherwise
    _serve_metrics(settings)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    await run_bridge(settings, stop)
    return 0


async def _run_billing(settings: Settings) -> int:
    missing = _missing_endpoints(settings)
    if missing:
        # Embedded services would be this process's own, empty ones: nothing to bill there.
        print(f"meter: run billing needs {', '.join(missing)}", file=sys.stderr)
        return 2
    from enforcement.billing_worker import run_billing
    from recharge.notify import LogNotifier
    from recharge.service import PaymentService
    from recharge.worker import make_gateway

    _serve_metrics(settings)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    gateway = make_gateway(settings)

    def payments(pool: Any, balances: Any) -> PaymentService:
        # Invoices' auto-pay and Pay Now charge the saved card through the payment service.
        return PaymentService(
            pool,
            balances,
            gateway,
            LogNotifier(),
            backoff_s=settings.backoff(),
            max_declines=settings.recharge_max_declines,
            charge_timeout_s=settings.payment_timeout_s,
        )

    try:
        await run_billing(settings, stop, payments=payments)
    finally:
        await gateway.close()
    return 0
