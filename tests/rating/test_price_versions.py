"""Versioned inbound, SMS and fee prices against real PostgreSQL, Redis and the processor: an
event is rated with the version in force at its time (a call's answered_at), a new version is
picked up by a running processor, and migration 0005 keeps the prices it found."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from balance.accounts import put_price_list
from contracts import topics
from enforcement.estimate import estimate
from infra.db import migrate
from infra.settings import Settings
from meter.traffic import call_hangup, demo_price_list, message_sent
from metering.processor import MeteringProcessor
from metering.worker import Connections
from rating.catalog import Catalog
from rating.pricelists import add_price_version, load_price_lists
from rating.rating import NoRate, PriceList
from tests import harness
from tests.conftest import Seeder, Services, eventually
from tests.helpers import Rec, database_before, produce

MIDNIGHT = datetime(2026, 1, 1, tzinfo=UTC)
M = int(MIDNIGHT.timestamp())
S = timedelta(seconds=1)


def _rec(ev: dict[str, Any], offset: int) -> Rec:
    topic = topics.MESSAGE_EVENTS if ev["type"] == "message.sent" else topics.CALL_EVENTS
    return Rec(topic, 0, offset, str(ev["subject"]).encode(), orjson.dumps(ev))


def _processor(conns: Connections, catalog: Catalog) -> MeteringProcessor:
    return harness.processor(conns, catalog)


async def _amounts(conns: Connections) -> dict[str, int]:
    rows = await conns.pool.fetch("SELECT ref, amount FROM ledger WHERE kind IN ('call', 'sms')")
    return {r["ref"]: r["amount"] for r in rows}


async def _standard(pool: asyncpg.Pool) -> PriceList:
    return (await load_price_lists(pool, ["standard"]))["standard"]


async def test_a_message_sent_before_a_midnight_change_costs_the_old_price(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1")  # SMS 0.004 a part, always
    await add_price_version(conns.pool, "standard", MIDNIGHT, sms_per_part=6_000)
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    out = await _processor(conns, catalog).process(
        [
            _rec(message_sent("acc_1", "before", "+447911123456", 2, at=MIDNIGHT - S), 0),
            _rec(message_sent("acc_1", "at", "+447911123456", 2, at=MIDNIGHT), 1),
            _rec(message_sent("acc_1", "after", "+447911123456", 1, at=MIDNIGHT + 9 * S), 2),
        ]
    )
    assert out.charged == 3
    assert await _amounts(conns) == {"before": -8_000, "at": -12_000, "after": -6_000}
    # the estimate prices a message at the time it is asked for
    before = await estimate(catalog, None, "acc_1", sms_parts=2, now=M - 1)
    after = await estimate(catalog, None, "acc_1", sms_parts=2, now=M)
    assert (before.cost, after.cost) == (8_000, 12_000)


async def test_an_inbound_call_answered_before_the_change_costs_the_old_rate(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1")  # inbound 0.0035/min, 6/6, always
    await add_price_version(
        conns.pool,
        "standard",
        MIDNIGHT,
        inbound_per_min=10_000,
        inbound_initial_s=60,
        inbound_subsequent_s=60,
    )
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    calls = [
        # answered 30 s before midnight, hung up 90 s after: all 120 s at the old rate
        call_hangup(
            "acc_1", "across", "+14155550100", 120, direction="inbound", at=MIDNIGHT + 90 * S
        ),
        # answered 10 s after midnight: the new rate and increments (61 s bills 120 s)
        call_hangup("acc_1", "new", "+14155550100", 61, direction="inbound", at=MIDNIGHT + 71 * S),
    ]
    out = await _processor(conns, catalog).process([_rec(e, i) for i, e in enumerate(calls)])
    assert out.charged == 2
    assert await _amounts(conns) == {"across": -7_000, "new": -20_000}
    before = await estimate(catalog, None, "acc_1", seconds=61, direction="inbound", now=M - 1)
    after = await estimate(catalog, None, "acc_1", seconds=61, direction="inbound", now=M)
    assert (before.cost, before.increments, after.cost, after.increments) == (
        3_850,
        "6/6",
        20_000,
        "60/60",
    )


async def test_number_and_one_time_fees_are_versioned(conns: Connections) -> None:
    spec = demo_price_list().model_copy(
        update={
            "number_monthly_fee": 1_000_000,
            "one_time_fees": {"number_setup": 500_000, "port_in": 300_000},
        }
    )
    await put_price_list(conns.pool, spec)
    await add_price_version(
        conns.pool,
        "standard",
        MIDNIGHT,
        number_monthly_fee=2_000_000,
        fees={"number_setup": 1_500_000, "transfer": 100_000},
    )
    await add_price_version(conns.pool, "standard", MIDNIGHT + 86_400 * S, fees={"port_in": None})
    pl = await _standard(conns.pool)
    assert [pl.rate_numbers(3, t) for t in (M - 1, M, M + 86_400)] == [
        3_000_000,
        6_000_000,
        6_000_000,
    ]
    assert [pl.one_time_fee("number_setup", t) for t in (M - 1, M, M + 86_400)] == [
        500_000,
        1_500_000,
        1_500_000,
    ]
    # fees not named are carried into the new version; None takes one out from then on
    assert [pl.one_time_fee("port_in", t) for t in (M - 1, M)] == [300_000, 300_000]
    with pytest.raises(NoRate):
        pl.one_time_fee("port_in", M + 86_400)
    with pytest.raises(NoRate):
        pl.one_time_fee("transfer", M - 1)
    assert pl.one_time_fee("transfer", M + 86_400) == 100_000
    # the prices not given are the ones in force before the new version
    assert {(v.sms_per_part, v.inbound.rate_per_min) for v in pl.price_versions()} == {
        (4_000, 3_500)
    }


async def test_adding_versions_keeps_history_and_put_price_list_replaces_it(
    conns: Connections,
) -> None:
    await put_price_list(conns.pool, demo_price_list())
    before = await conns.pool.fetchval("SELECT version FROM price_lists WHERE id = 'standard'")
    # added out of order: a later version first, then one between the first and it
    await add_price_version(conns.pool, "standard", MIDNIGHT + 10 * S, sms_per_part=7_000)
    await add_price_version(conns.pool, "standard", MIDNIGHT, inbound_per_min=5_000)
    pl = await _standard(conns.pool)
    assert [
        (v.effective_from, v.sms_per_part, v.inbound.rate_per_min) for v in pl.price_versions()
    ] == [
        (0, 4_000, 3_500),
        (M, 4_000, 5_000),
        # written before the version at M existed: it keeps the inbound rate it copied
        (M + 10, 7_000, 3_500),
    ]
    # the same start replaces that version only, changing just what is given
    await add_price_version(conns.pool, "standard", MIDNIGHT, sms_per_part=5_000)
    pl = await _standard(conns.pool)
    assert [(v.sms_per_part, v.inbound.rate_per_min) for v in pl.price_versions()] == [
        (4_000, 3_500),
        (5_000, 5_000),
        (7_000, 3_500),
    ]
    assert pl.version == before + 3
    await put_price_list(conns.pool, demo_price_list())
    pl = await _standard(conns.pool)
    assert [(v.effective_from, v.sms_per_part) for v in pl.price_versions()] == [(0, 4_000)]
    assert pl.rate_message(1, M + 10) == 4_000


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sms_per_part": 0.004}, "sms_per_part"),  # never a float
        ({"sms_per_part": -1}, "sms_per_part"),
        ({"inbound_per_min": 1_000_000_001}, "inbound_per_min"),
        ({"inbound_initial_s": 0}, "inbound_initial_s"),
        ({"inbound_subsequent_s": 3_601}, "inbound_subsequent_s"),
        ({"number_monthly_fee": True}, "number_monthly_fee"),
        ({"fees": {"Setup": 1}}, "fee code"),
        ({"fees": {"setup": -5}}, "fee setup"),
    ],
)
async def test_a_bad_price_is_refused_and_nothing_is_written(
    conns: Connections, kwargs: dict[str, Any], error: str
) -> None:
    await put_price_list(conns.pool, demo_price_list())
    with pytest.raises(ValueError, match=error):
        await add_price_version(conns.pool, "standard", MIDNIGHT, **kwargs)
    assert len((await _standard(conns.pool)).price_versions()) == 1


async def test_add_price_version_needs_an_existing_list_and_an_aware_time(
    conns: Connections,
) -> None:
    with pytest.raises(LookupError):
        await add_price_version(conns.pool, "nope", MIDNIGHT, sms_per_part=1)
    await put_price_list(conns.pool, demo_price_list())
    with pytest.raises(ValueError, match="time zone"):
        await add_price_version(conns.pool, "standard", datetime(2026, 1, 1), sms_per_part=1)


async def test_a_running_processor_picks_up_a_new_price_version(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="100.00")
    async with harness.running_worker(settings, conns) as outcomes:
        first = message_sent("acc_1", "m1", "+447911123456", 1)
        await produce(conns.producer, topics.MESSAGE_EVENTS, [first])
        await eventually(lambda: _charged(outcomes, 1))
        await add_price_version(
            conns.pool,
            "standard",
            datetime.now(UTC) - timedelta(minutes=5),
            sms_per_part=9_000,
            inbound_per_min=60_000,
        )
        await asyncio.sleep(1.2)  # the worker's catalog checks the version every second
        sms = message_sent("acc_1", "m2", "+447911123456", 1)
        call = call_hangup("acc_1", "c1", "+14155550100", 60, direction="inbound")
        await produce(conns.producer, topics.MESSAGE_EVENTS, [sms])
        await produce(conns.producer, topics.CALL_EVENTS, [call])
        await eventually(lambda: _charged(outcomes, 3))
    assert await _amounts(conns) == {"m1": -4_000, "m2": -9_000, "c1": -60_000}


async def _charged(outcomes: list[Any], n: int) -> bool:
    return sum(o.charged for o in outcomes) >= n


async def test_migration_0005_moves_current_prices_into_a_first_version(
    services: Services,
) -> None:
    async with database_before(services.admin_dsn, 5) as db:
        conn = db.conn
        await conn.execute(
            "INSERT INTO price_lists (id, inbound_per_min, inbound_initial_s,"
            " inbound_subsequent_s, sms_per_part, number_monthly_fee, created_at)"
            " VALUES ('old', 3500, 60, 6, 4000, 1000000, '2025-03-04T05:06:07.891Z'),"
            " ('bare', 0, 6, 6, 1, 0, '2025-06-01T00:00:00Z');"
            "INSERT INTO price_list_fees VALUES ('old', 'number_setup', 500000),"
            " ('old', 'port_in', 300000);"
            "INSERT INTO price_list_rates (price_list_id, prefix, rate_per_min)"
            " VALUES ('old', '44', 15000)"
        )
        assert (await migrate(conn))[0] == "0005_versioned_prices.sql"
        created = int(datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp())
        rows = await conn.fetch(
            "SELECT price_list_id, effective_from, code, amount FROM price_list_fees ORDER BY code"
        )
        assert [tuple(r) for r in rows] == [
            ("old", datetime.fromtimestamp(created, UTC), "number_setup", 500_000),
            ("old", datetime.fromtimestamp(created, UTC), "port_in", 300_000),
        ]
        # a list inserted after the migration gets its opening prices from its columns
        await conn.execute(
            "INSERT INTO price_lists (id, inbound_per_min, sms_per_part) VALUES ('new', 1, 2)"
        )
        pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
        assert pool is not None
        try:
            lists = await load_price_lists(pool)
        finally:
            await pool.close()
        old = lists["old"]
        [v] = old.price_versions()
        assert v.effective_from == created
        assert (v.inbound.rate_per_min, v.inbound.initial_s, v.inbound.subsequent_s) == (
            3_500,
            60,
            6,
        )
        assert (v.sms_per_part, v.number_monthly_fee) == (4_000, 1_000_000)
        assert dict(v.one_time_fees) == {"number_setup": 500_000, "port_in": 300_000}
        # rated as before the migration, also for an event older than the list
        for at in (created - 86_400, created, created + 86_400):
            assert old.rate_call("inbound", "", 61, at) == (3_850, 66)
            assert old.rate_message(2, at) == 8_000
        assert old.outbound_rate("+442071234567").rate_per_min == 15_000
        assert [v.sms_per_part for v in lists["bare"].price_versions()] == [1]
        assert [v.sms_per_part for v in lists["new"].price_versions()] == [2]
