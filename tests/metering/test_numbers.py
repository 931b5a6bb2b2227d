"""Number fees on the metering hot path, against the real broker, Redis and PostgreSQL:
activation (setup + the month), renewals (validated and acknowledged: the numbers worker
charges them, tests/enforcement/test_numbers.py), deactivation, dead letters, managed
accounts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from balance.accounts import AccountSpec, create_accounts, put_price_list
from contracts import topics
from infra.kafkatools import read_all
from infra.settings import Settings
from meter.traffic import demo_price_list, number_event
from metering.processor import BatchOutcome
from metering.worker import Connections
from ops.reconcile import reconcile
from rating.catalog import Catalog
from tests import harness
from tests.conftest import Seeder, eventually
from tests.helpers import Rec, produce

NUMBER = "+14155550199"
MONTHLY = 1_000_000  # 1.00
SETUP = 500_000  # 0.50
OPENING = 20_000_000  # 20.00


def month_of(t: datetime, shift: int = 0) -> str:
    m = t.year * 12 + t.month - 1 + shift
    return f"{m // 12:04d}-{m % 12 + 1:02d}"


async def seed_priced(conns: Connections, *ids: str, setup: bool = True) -> None:
    """Accounts on price list ``numbers``: 1.00 a month per number, 0.50 to set one up."""
    spec = demo_price_list("numbers").model_copy(
        update={
            "number_monthly_fee": MONTHLY,
            "one_time_fees": {"number_setup": SETUP} if setup else {},
        }
    )
    await put_price_list(conns.pool, spec)
    await create_accounts(
        conns.pool,
        conns.balances,
        [
            AccountSpec.model_validate({"id": a, "price_list_id": "numbers", "balance": "20.00"})
            for a in ids
        ],
    )


async def fee_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT account_id, amount, quantity, ref, rate_ref, event_id FROM ledger"
        " WHERE kind = 'fee' ORDER BY event_id"
    )


async def balance(conns: Connections, account: str) -> int:
    st = await conns.balances.get(account)
    assert st is not None
    return st.balance


async def seen(outcomes: list[BatchOutcome], n: int) -> bool:
    return sum(o.records for o in outcomes) >= n


def accounted(outcomes: list[BatchOutcome]) -> int:
    """Records a batch says what it did with: every record is exactly one of these."""
    return sum(
        o.charged + o.duplicates + o.call_updates + o.acknowledged + sum(o.dead_letters.values())
        for o in outcomes
    )


async def test_activation_charges_setup_and_the_month_once_even_when_published_twice(
    settings: Settings, conns: Connections
) -> None:
    await seed_priced(conns, "acc_1")
    at = datetime.now(UTC)
    ev = number_event("number.activated", "acc_1", NUMBER, at=at)
    await produce(conns.producer, topics.NUMBER_EVENTS, [ev, ev])
    async with harness.running_worker(settings, conns) as outcomes:
        await eventually(lambda: seen(outcomes, 2))
    rows = await fee_rows(conns.pool)
    assert [tuple(r) for r in rows] == [
        (
            "acc_1",
            -(SETUP + MONTHLY),
            1,
            NUMBER,
            f"numbers:number_setup+monthly:{month_of(at)}",
            ev["id"],
        )
    ]
    assert await balance(conns, "acc_1") == OPENING - SETUP - MONTHLY
    assert (sum(o.charged for o in outcomes), sum(o.duplicates for o in outcomes)) == (1, 1)
    assert sum(o.charged_micros for o in outcomes) == SETUP + MONTHLY
    assert accounted(outcomes) == 2
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.ok and rec.drift_micros == 0


async def test_activation_without_a_setup_fee_charges_the_month_only(
    settings: Settings, conns: Connections
) -> None:
    await seed_priced(conns, "acc_1", setup=False)
    at = datetime.now(UTC)
    ev = number_event("number.activated", "acc_1", NUMBER, at=at)
    await produce(conns.producer, topics.NUMBER_EVENTS, [ev])
    async with harness.running_worker(settings, conns) as outcomes:
        await eventually(lambda: seen(outcomes, 1))
    rows = await fee_rows(conns.pool)
    assert [(r["amount"], r["rate_ref"]) for r in rows] == [
        (-MONTHLY, f"numbers:monthly:{month_of(at)}")
    ]
    assert await balance(conns, "acc_1") == OPENING - MONTHLY
    assert (await reconcile(conns.pool, conns.balances)).ok


async def test_renewals_are_validated_and_acknowledged_not_charged_on_the_hot_path(
    settings: Settings, conns: Connections
) -> None:
    # The renewal is the numbers worker's (it knows auto-pay and whether the credit covers
    # the month): the hot path dead-letters a bad one and takes a good one without a debit.
    await seed_priced(conns, "acc_1")
    at = datetime.now(UTC)
    this, ahead, late = month_of(at), month_of(at, 1), month_of(at, -12)
    renewals = [
        number_event("number.renewal_due", "acc_1", NUMBER, period=p, at=at)
        for p in (this, ahead, late)
    ]
    await produce(conns.producer, topics.NUMBER_EVENTS, renewals + renewals[:1])
    async with harness.running_worker(settings, conns) as outcomes:
        await eventually(lambda: seen(outcomes, 4))
    assert await fee_rows(conns.pool) == []
    assert await balance(conns, "acc_1") == OPENING
    assert sum(o.acknowledged for o in outcomes) == 4
    assert sum(o.charged for o in outcomes) == 0
    assert accounted(outcomes) == 4
    assert (await reconcile(conns.pool, conns.balances)).ok


async def test_a_price_list_without_number_fees_charges_zero_and_the_rest_nothing(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="20.00")  # the demo price list: no monthly fee, no setup fee
    at = datetime.now(UTC)
    events = [
        number_event("number.activated", "acc_1", NUMBER, at=at),
        number_event("number.renewal_due", "acc_1", NUMBER, period=month_of(at), at=at),
        number_event("number.deactivated", "acc_1", NUMBER, at=at),
    ]
    await produce(conns.producer, topics.NUMBER_EVENTS, events)
    async with harness.running_worker(settings, conns) as outcomes:
        await eventually(lambda: seen(outcomes, 3))
    rows = await fee_rows(conns.pool)
    # A charged event is accounted for with a row, even at 0; the renewal (the numbers
    # worker's) and the deactivation have none here.
    assert sorted((r["amount"], r["rate_ref"]) for r in rows) == [
        (0, f"standard:monthly:{month_of(at)}"),
    ]
    assert {r["event_id"] for r in rows} == {events[0]["id"]}
    assert await balance(conns, "acc_1") == OPENING
    assert sum(o.charged for o in outcomes) == 1
    assert sum(o.acknowledged for o in outcomes) == 2
    assert not any(o.dead_letters for o in outcomes)
    assert accounted(outcomes) == 3
    assert (await reconcile(conns.pool, conns.balances)).ok


async def test_bad_number_events_are_dead_lettered_and_change_no_balance(
    settings: Settings, conns: Connections
) -> None:
    await seed_priced(conns, "acc_1")
    at = datetime.now(UTC)
    not_e164 = number_event("number.activated", "acc_1", "14155550199", at=at)
    bad_form = number_event("number.renewal_due", "acc_1", NUMBER, period="2026-13", at=at)
    too_far = number_event("number.renewal_due", "acc_1", NUMBER, period=month_of(at, 2), at=at)
    too_late = number_event("number.renewal_due", "acc_1", NUMBER, period=month_of(at, -13), at=at)
    ghost = number_event("number.activated", "ghost_1", NUMBER, at=at)
    ghost_off = number_event("number.deactivated", "ghost_1", NUMBER, at=at)
    wrong_key = number_event("number.activated", "acc_1", "+14155550100", at=at)
    future = number_event("number.activated", "acc_1", "+14155550101", at=at + timedelta(days=1))
    bad: list[tuple[str, dict[str, Any], bytes]] = [
        ("schema", not_e164, b"acc_1"),
        ("schema", bad_form, b"acc_1"),
        ("bad_period", too_far, b"acc_1"),
        ("bad_period", too_late, b"acc_1"),
        ("unknown_account", ghost, b"ghost_1"),
        ("unknown_account", ghost_off, b"ghost_1"),
        ("key_mismatch", wrong_key, b"acc_2"),
        ("future_timestamp", future, b"acc_1"),
    ]
    for _, ev, key in bad:
        await produce(conns.producer, topics.NUMBER_EVENTS, [ev], key=key)
    # A number event on the call topic is not charged there either.
    activation = number_event("number.activated", "acc_1", "+14155550102", at=at)
    await produce(conns.producer, topics.CALL_EVENTS, [activation])
    bad.append(("wrong_topic", activation, b"acc_1"))

    async with harness.running_worker(settings, conns) as outcomes:
        await eventually(lambda: seen(outcomes, len(bad)))
    dead = await read_all(settings.kafka_bootstrap, topics.DEAD_LETTER, expect=len(bad))
    got = sorted(
        (dict(m.headers)["error.reason"].decode(), orjson.loads(m.value)["id"], m.key) for m in dead
    )
    assert got == sorted((reason, ev["id"], key) for reason, ev, key in bad)
    details = {orjson.loads(m.value)["id"]: dict(m.headers)["error.detail"].decode() for m in dead}
    assert "data.number" in details[not_e164["id"]]
    assert "data.period" in details[bad_form["id"]]
    assert f"period {month_of(at, 2)} is 2 months after" in details[too_far["id"]]
    assert f"period {month_of(at, -13)} is 13 months before" in details[too_late["id"]]
    assert await fee_rows(conns.pool) == []
    assert await balance(conns, "acc_1") == OPENING
    assert sum(o.charged + o.acknowledged for o in outcomes) == 0
    assert accounted(outcomes) == len(bad)
    assert (await reconcile(conns.pool, conns.balances)).ok


async def test_a_managed_account_pays_its_managers_number_fees(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed_priced(conns, "boss")
    await seed("other")  # puts the fee-less demo list "standard" in place
    await create_accounts(
        conns.pool,
        conns.balances,
        [
            AccountSpec.model_validate({"id": "sub_1", "manager_id": "boss", "balance": "20.00"}),
            AccountSpec.model_validate(
                {
                    "id": "sub_2",
                    "manager_id": "boss",
                    "price_list_id": "standard",
                    "balance": "20.00",
                }
            ),
        ],
    )
    at = datetime.now(UTC)
    events = [number_event("number.activated", a, NUMBER, at=at) for a in ("sub_1", "sub_2")]
    await produce(conns.producer, topics.NUMBER_EVENTS, events)
    async with harness.running_worker(settings, conns) as outcomes:
        await eventually(lambda: seen(outcomes, 2))
    rows = {r["account_id"]: (r["amount"], r["rate_ref"]) for r in await fee_rows(conns.pool)}
    assert rows == {
        "sub_1": (-(SETUP + MONTHLY), f"numbers:number_setup+monthly:{month_of(at)}"),
        "sub_2": (0, f"standard:monthly:{month_of(at)}"),  # its own price list wins
    }
    assert await balance(conns, "sub_1") == OPENING - SETUP - MONTHLY
    assert await balance(conns, "boss") == OPENING  # the manager's prices, not its money
    assert (await reconcile(conns.pool, conns.balances)).ok


async def test_number_events_and_calls_in_one_batch_are_each_charged(
    conns: Connections, seed: Seeder
) -> None:
    """One batch holding calls, messages and number events: every kind takes its own path,
    and the calls are charged exactly as without the number events."""
    from meter.traffic import call_hangup, message_sent
    from tests.helpers import expected_cost

    await seed_priced(conns, "acc_1")
    at = datetime.now(UTC)
    call = call_hangup("acc_1", "c1", "+442071234567", 61, at=at)
    sms = message_sent("acc_1", "m1", "+442071234567", 2, at=at)
    on = number_event("number.activated", "acc_1", NUMBER, at=at)
    off = number_event("number.deactivated", "acc_1", NUMBER, at=at)
    stream = [
        (topics.CALL_EVENTS, call),
        (topics.NUMBER_EVENTS, on),
        (topics.MESSAGE_EVENTS, sms),
        (topics.NUMBER_EVENTS, off),
    ]
    records = [Rec(t, 0, i, b"acc_1", orjson.dumps(e)) for i, (t, e) in enumerate(stream)]
    catalog = Catalog(conns.pool)
    await catalog.refresh()

    processor = harness.processor(conns, catalog)
    out = await processor.process(records)
    assert (out.charged, out.acknowledged, out.dead_letters) == (3, 1, {})
    kinds = dict(await conns.pool.fetch("SELECT kind, amount FROM ledger WHERE kind <> 'opening'"))
    assert kinds == {
        "call": -expected_cost(call),
        "sms": -expected_cost(sms),
        "fee": -(SETUP + MONTHLY),
    }
    again = await processor.process(records)  # a replay: nothing charged twice
    assert (again.charged, again.duplicates, again.acknowledged) == (0, 3, 1)
    assert await balance(conns, "acc_1") == OPENING - sum(-a for a in kinds.values())
    assert (await reconcile(conns.pool, conns.balances)).ok
