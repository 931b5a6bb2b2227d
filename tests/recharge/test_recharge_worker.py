"""The recharge worker end to end: usage crosses the threshold in the metering processor, the
trigger travels on its own topic, the faust-hosted worker (a real process) charges the card and
credits the balance. Then the crash the issue names: the worker is SIGKILLed after Stripe has
charged the card and before the balance is credited; after a restart, exactly one charge and
exactly one credit. And a gateway timeout after a successful charge, retried with the same
idempotency key: one charge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import stripe

from contracts import topics
from infra.ledger import PostgresLedger
from infra.settings import Settings
from metering.worker import Connections
from recharge.service import PaymentService
from recharge.stripe_gateway import StripeGateway
from tests import harness
from tests.conftest import Seeder, eventually
from tests.helpers import produce
from tests.recharge.world import Collected
from tests.stripe_fake import API_KEY, StripeFake

ROOT = Path(__file__).resolve().parents[2]
USD = 1_000_000
PI_PATH = "/v1/payment_intents"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[StripeFake]:
    monkeypatch.setattr(stripe, "enable_telemetry", False)
    with StripeFake() as f:
        yield f


def start_recharge_worker(
    settings: Settings, fake: StripeFake, log: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env.update(
        {
            "METER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "METER_REDIS_URL": settings.redis_url,
            "METER_DATABASE_URL": settings.database_url,
            "METER_RECHARGE_GROUP": settings.consumer_group + "-recharge",
            "METER_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "METER_PAYMENT_GATEWAY": "stripe",
            "METER_STRIPE_API_KEY": API_KEY,
            "METER_STRIPE_API_BASE": fake.url,
            "METER_PAYMENT_TIMEOUT_S": "1",
            "METER_RECHARGE_SCAN_INTERVAL_S": "0.5",
            "METER_DATA_DIR": str(settings.data_dir),
            "HOME": str(settings.data_dir),  # stripe writes its telemetry id under ~/.config
        }
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "meter.cli", "run", "recharge"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
async def service(conns: Connections, fake: StripeFake) -> AsyncIterator[PaymentService]:
    gw = StripeGateway(API_KEY, api_base=fake.url, timeout_s=0.5)
    yield PaymentService(conns.pool, conns.balances, gw, Collected(), charge_timeout_s=0.5)
    await gw.close()


def hangup(account: str, n: int, seconds: int) -> dict[str, object]:
    at = datetime.now(UTC) - timedelta(seconds=seconds + 60)
    return {
        "specversion": "1.0",
        "id": f"h-{account}-{n}",
        "source": "urn:switch:test",
        "type": "call.hangup",
        "time": (at + timedelta(seconds=seconds)).isoformat(),
        "subject": account,
        "datacontenttype": "application/json",
        "data": {
            "account_id": account,
            "call_id": f"c-{account}-{n}",
            "direction": "outbound",
            "from": "+15550000001",
            "to": "+442071234567",
            "answered_at": at.isoformat(),
            "ended_at": (at + timedelta(seconds=seconds)).isoformat(),
            "billable_s": seconds,
            "hangup_cause": "normal_clearing",
        },
    }


async def _credits(conns: Connections, account: str) -> int:
    return int(
        await conns.pool.fetchval(
            "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'credit'"
            " AND source = 'urn:meter:payments'",
            account,
        )
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_killed_between_charge_and_credit_then_restarted_charges_and_credits_once(
    settings: Settings,
    conns: Connections,
    seed: Seeder,
    service: PaymentService,
    fake: StripeFake,
    tmp_path: Path,
) -> None:
    await seed("acc", balance="30.00")
    await service.save_method("acc", "pm_card_visa")
    await service.set_auto_recharge("acc", True, 20 * USD, 50 * USD)
    # Stripe does the work and stores it, then holds the answer: the worker dies waiting.
    fake.delay_next(PI_PATH, 60)
    log = tmp_path / "recharge.log"
    proc = start_recharge_worker(settings, fake, log)
    try:
        async with harness.running_worker(settings, conns):
            # two long calls take the balance below $20 (the demo price list: $0.015/min to +44)
            await produce(
                conns.producer, topics.CALL_EVENTS, [hangup("acc", i, 40_000) for i in range(2)]
            )

            async def charged() -> bool:
                assert proc.poll() is None, log.read_text()[-3000:]
                return len(fake.charges) == 1

            await eventually(charged, within=60)
            proc.send_signal(signal.SIGKILL)  # charged at the gateway, nothing credited yet
            proc.wait()
            assert await _credits(conns, "acc") == 0
            status = await conns.pool.fetchval(
                "SELECT status FROM payments WHERE account_id = 'acc'"
            )
            assert status == "pending"
            st = await conns.balances.get("acc")
            assert st is not None and st.balance < 20 * USD
            balance_before = st.balance

            proc = start_recharge_worker(settings, fake, log)

            async def credited() -> bool:
                assert proc.poll() is None, log.read_text()[-3000:]
                return await _credits(conns, "acc") == 1

            await eventually(credited, within=90)
    finally:
        _stop(proc)
    assert len(fake.charges) == 1  # the retry carried the same idempotency key
    assert len(fake.payment_intents) == 1
    (p,) = await service.payments("acc")
    assert p.status == "succeeded" and p.captured == p.amount
    st = await conns.balances.get("acc")
    assert st is not None and st.balance == balance_before + p.captured
    ledger = (await PostgresLedger(conns.pool).balances(["acc"]))["acc"]
    assert ledger == st.balance  # invariant 2 holds through the crash
    assert st.balance >= 70 * USD  # up to threshold + recharge


async def test_a_timeout_after_a_successful_charge_is_retried_with_the_same_key(
    conns: Connections, seed: Seeder, service: PaymentService, fake: StripeFake
) -> None:
    await seed("acc", balance="0.00")
    await service.save_method("acc", "pm_card_visa")
    fake.delay_next(PI_PATH, 3)  # charged, but the answer comes after the client gave up
    p = await service.top_up("acc", 25 * USD, "pay-1")
    assert p.status == "succeeded" and p.captured == 25 * USD
    assert len(fake.charges) == 1 and len(fake.payment_intents) == 1
    keys = {r.headers.get("idempotency-key") for r in fake.requests_to("POST", PI_PATH)}
    assert keys == {"acc/pay-1"} and len(fake.requests_to("POST", PI_PATH)) >= 2
    st = await conns.balances.get("acc")
    assert st is not None and st.balance == 25 * USD
    assert await _credits(conns, "acc") == 1


async def test_an_outcome_stripe_never_tells_is_retried_then_left_for_an_operator(
    conns: Connections, seed: Seeder, fake: StripeFake
) -> None:
    from tests.recharge.world import Clock

    clock = Clock(datetime.now(UTC))
    gw = StripeGateway(API_KEY, api_base=fake.url, timeout_s=0.5)
    notes = Collected()

    async def no_sleep(_: float) -> None:
        return None

    svc = PaymentService(
        conns.pool, conns.balances, gw, notes, charge_timeout_s=0.5, clock=clock, sleep=no_sleep
    )
    try:
        await seed("acc", balance="0.00")
        await svc.save_method("acc", "pm_card_visa")
        # a 500 Stripe stores under the key: every retry with it gets the same 500
        fake.fail_next(PI_PATH, times=1, stored=True)
        p = await svc.top_up("acc", 25 * USD, "pay-500")
        assert p.status == "pending"
        clock.now += timedelta(minutes=1)
        await svc.recover()  # retried with the same key, still unknown
        assert (await svc.payments("acc"))[0].status == "pending"
        clock.now += timedelta(hours=23)
        await svc.recover()
        (p,) = await svc.payments("acc")
        assert (p.status, p.reason, p.captured) == ("failed", "outcome_unknown", 0)
        assert notes.types() == ["payment.failed"]
        keys = {r.headers.get("idempotency-key") for r in fake.requests_to("POST", PI_PATH)}
        assert keys == {"acc/pay-500"}  # never a second key, so never a second charge
        st = await conns.balances.get("acc")
        assert st is not None and st.balance == 0 and await _credits(conns, "acc") == 0
    finally:
        await gw.close()
