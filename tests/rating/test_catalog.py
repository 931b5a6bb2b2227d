"""The rating catalog's cache: read ahead at start, bounded, and never short of a batch's
accounts; billing groups read only for the accounts that have some."""

from __future__ import annotations

from metering.worker import Connections
from rating.catalog import Catalog
from tests.conftest import Seeder


async def test_preload_reads_accounts_ahead_up_to_the_bound(
    conns: Connections, seed: Seeder
) -> None:
    ids = [f"pre{i}" for i in range(7)]
    await seed(*ids)
    catalog = Catalog(conns.pool, max_accounts=5)
    await catalog.refresh()
    assert await catalog.preload(page=2) == 5  # several pages, stopped at the bound
    cached = [a for a in ids if catalog.get(a) is not None]
    assert cached == ids[:5]  # by id, without a resolve
    rating = catalog.get("pre0")
    assert rating is not None and rating.price_list.id == "standard" and rating.plan is None
    assert await Catalog(conns.pool).preload() >= 7  # the default bound holds them all


async def test_the_bound_drops_the_oldest_never_an_account_of_the_batch(
    conns: Connections, seed: Seeder
) -> None:
    await seed("b1", "b2", "b3", "b4", "b5")
    catalog = Catalog(conns.pool, max_accounts=3)
    await catalog.refresh()
    for a in ("b1", "b2", "b3", "b4"):  # the fourth is one over: b1, the oldest, goes
        await catalog.resolve([a])
    assert [catalog.get(a) is not None for a in ("b1", "b2", "b3", "b4")] == [
        False,
        True,
        True,
        True,
    ]
    await catalog.resolve(["b2", "b5", "b1"])  # b2 is the oldest but is in the batch
    assert all(catalog.get(a) is not None for a in ("b2", "b5", "b1"))
    assert catalog.get("b3") is None and catalog.get("b4") is None


async def test_billing_groups_are_read_for_an_account_that_gets_its_first_one(
    conns: Connections, seed: Seeder
) -> None:
    await seed("g1", "g2")
    catalog = Catalog(conns.pool, check_interval_s=0)
    await catalog.resolve(["g1", "g2"])
    g1 = catalog.get("g1")
    assert g1 is not None and g1.groups is None
    await conns.pool.execute(
        "INSERT INTO billing_groups (account_id, id, name) VALUES ($1, $2, 'Sales')",
        "g1",
        "bg_0123456789abcdef",
    )
    await catalog.resolve(["g1", "g2"])  # the version moved: read again, with g1's group
    g1, g2 = catalog.get("g1"), catalog.get("g2")
    assert g1 is not None and g1.groups is not None and g2 is not None and g2.groups is None
