"""API keys against the real PostgreSQL: only hashes stored, the cache, revocation, and what a
key lookup does when PostgreSQL is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from infra.db import create_pool
from infra.http.api_keys import ApiKey, ApiKeys, KeyStoreUnavailable, key_hash


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url)
    await pool.execute(
        "INSERT INTO price_lists (id, inbound_per_min, sms_per_part) VALUES ('p', 0, 0);"
        "INSERT INTO accounts (id, price_list_id) VALUES ('acc_1', 'p'), ('acc_2', 'p')"
    )
    yield pool
    await pool.close()


class CountingKeys(ApiKeys):
    lookups = 0

    async def _lookup(self, h: bytes) -> ApiKey | None:
        self.lookups += 1
        return await super()._lookup(h)


async def test_a_key_is_stored_as_its_hash_and_found_again(pool: asyncpg.Pool) -> None:
    keys = ApiKeys(pool)
    made, key = await keys.create("acc_1", "service")
    assert made == ApiKey(made.key_id, "acc_1", "service")
    assert key.startswith(f"mk_{made.key_id}_")
    row = await pool.fetchrow("SELECT * FROM api_keys")
    assert row is not None and row["key_hash"] == key_hash(key)
    assert key not in repr(dict(row))
    assert await ApiKeys(pool).authenticate(key) == made
    assert await keys.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert await keys.authenticate("") is None
    with pytest.raises(LookupError):
        await keys.create("ghost", "user")
    with pytest.raises(ValueError, match="role"):
        await keys.create("acc_1", "root")  # type: ignore[arg-type]


async def test_a_thousand_requests_with_a_new_key_make_one_query(pool: asyncpg.Pool) -> None:
    keys = ApiKeys(pool)
    _, key = await keys.create("acc_1", "user")
    fresh = CountingKeys(pool)
    found = await asyncio.gather(*(fresh.authenticate(key) for _ in range(1000)))
    assert {k.account_id for k in found if k} == {"acc_1"} and all(found)
    assert fresh.lookups == 1


async def test_revocation_shows_after_the_cache_ttl(pool: asyncpg.Pool) -> None:
    clock = Clock()
    keys = ApiKeys(pool, ttl_s=5.0, clock=clock)
    made, key = await keys.create("acc_1", "admin")
    assert await keys.authenticate(key) == made
    await ApiKeys(pool).revoke(made.key_id)  # by another process: this cache does not know
    clock.now += 4.9
    assert await keys.authenticate(key) == made  # within the TTL
    clock.now += 0.2
    # Past the TTL the cached answer is still given, while it is re-read in the background...
    assert await keys.authenticate(key) == made
    for _ in range(100):
        await asyncio.sleep(0.01)
        if await keys.authenticate(key) is None:
            break
    # ...and as soon as that read is back, the key is refused.
    assert await keys.authenticate(key) is None


async def test_a_key_store_outage(pool: asyncpg.Pool, database_url: str) -> None:
    clock = Clock()
    own = await create_pool(database_url)
    keys = ApiKeys(own, ttl_s=5.0, stale_s=60.0, clock=clock)
    made, key = await keys.create("acc_1", "service")
    _, other = await ApiKeys(pool).create("acc_2", "user")
    assert await keys.authenticate(key) == made
    await own.close()  # PostgreSQL is gone, as far as this cache can tell
    clock.now += 30
    # A known key keeps working through the outage (calls keep connecting)...
    assert await keys.authenticate(key) == made
    await asyncio.sleep(0.05)
    assert await keys.authenticate(key) == made
    # ...an unknown one cannot be checked: that is an error, not a "no".
    with pytest.raises(KeyStoreUnavailable):
        await keys.authenticate(other)
    # ...and not forever.
    clock.now += 60
    with pytest.raises(KeyStoreUnavailable):
        await keys.authenticate(key)
