"""The Lua scripts as they run: assembled from their fragments, loaded into the session's real
Redis, called by the SHA the Python side computes; key names only from balance/keys.py."""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from balance import keys, scripts
from balance.store import RedisBalances

LUA = importlib.resources.files("balance").joinpath("lua")
SUFFIXES = (keys.APPLIED_SUFFIX, keys.OUTBOX_SUFFIX, keys.CREDITS_SUFFIX, keys.RESERVATIONS_SUFFIX)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


def test_every_script_of_the_package_is_listed() -> None:
    on_disk = {p.name for p in LUA.iterdir() if p.name.endswith(".lua")}
    assert on_disk == set(scripts.SCRIPTS)


async def test_every_script_loads_into_redis_under_the_sha_the_store_calls(
    redis: aioredis.Redis,
) -> None:
    loaded = {}
    for name in scripts.SCRIPTS:
        text = scripts.source(name)
        assert "--#include" not in text, name
        loaded[name] = await redis.script_load(text)  # compiles it: a Lua syntax error fails here
        assert scripts.register(redis, name).sha == loaded[name], name
    store = RedisBalances(redis)
    called = {v.sha for v in vars(store).values() if isinstance(v, AsyncScript)}
    assert called == set(loaded.values())


async def test_a_flushed_script_cache_is_refilled_on_noscript(redis: aioredis.Redis) -> None:
    ack = scripts.register(redis, "outbox_ack.lua")
    await redis.script_flush()
    assert await ack(keys=[keys.outbox("a"), keys.account("a")], args=[5]) == 0
    assert await redis.script_exists(ack.sha) == [True]


def test_no_script_spells_a_key_name() -> None:
    """Key names come from balance/keys.py: the only suffixes in the assembled scripts are those
    of the generated lib/keys.lua, and no .lua file spells one (comments included)."""
    texts = {f"assembled {n}": scripts.source(n) for n in scripts.SCRIPTS}
    texts |= {p.name: p.read_text("utf-8") for p in LUA.iterdir() if p.name.endswith(".lua")}
    texts |= {f"lib/{p.name}": p.read_text("utf-8") for p in LUA.joinpath("lib").iterdir()}
    generated = scripts.keys_fragment()
    for where, text in texts.items():
        rest = text.replace(generated, "")
        for spelled in (*SUFFIXES, "{a:", "meter:"):
            assert spelled not in rest, (where, spelled)


async def test_lua_derives_the_key_names_python_does(redis: aioredis.Redis) -> None:
    probe = scripts.keys_fragment() + (
        "return {KEYS[1] .. APPLIED_SUFFIX .. string.format('%d', ARGV[1]),"
        " KEYS[1] .. OUTBOX_SUFFIX, KEYS[1] .. CREDITS_SUFFIX, KEYS[1] .. RESERVATIONS_SUFFIX}"
    )
    got = await redis.eval(probe, 1, keys.account("x|1"), 20_123)
    want = [
        keys.applied("x|1", 20_123),
        keys.outbox("x|1"),
        keys.credits("x|1"),
        keys.reservations("x|1"),
    ]
    assert [g.decode() for g in got] == want


def test_every_shared_function_is_defined_once_in_every_script() -> None:
    for name in scripts.SCRIPTS:
        defined = re.findall(r"^local function (\w+)", scripts.source(name), re.MULTILINE)
        assert len(defined) == len(set(defined)), name


def test_every_fragment_is_used() -> None:
    included: set[str] = set()
    for p in [*LUA.iterdir(), *LUA.joinpath("lib").iterdir()]:
        if p.name.endswith(".lua"):
            included |= set(re.findall(r"^--#include (\S+)$", p.read_text("utf-8"), re.MULTILINE))
    fragments = {f"lib/{p.name}" for p in LUA.joinpath("lib").iterdir()}
    assert included == fragments | {scripts.KEYS_FRAGMENT}


# -- the include machinery, on fragments of its own ----------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


async def test_a_fragment_used_twice_is_included_once_before_its_users(
    tmp_path: Path, redis: aioredis.Redis
) -> None:
    root = _write(
        tmp_path,
        {
            "lib/one.lua": "local function one() return 1 end\n",
            "lib/two.lua": "--#include lib/one.lua\nlocal function two() return 2 * one() end\n",
            "main.lua": "--#include lib/one.lua\n--#include lib/two.lua\n"
            "--#include lib/one.lua\nreturn {one(), two()}\n",
        },
    )
    text = scripts.assemble("main.lua", root)
    assert text.count("local function one()") == 1 and text.count("local function two()") == 1
    assert "--#include" not in text
    assert await redis.eval(text, 0) == [1, 2]


def test_a_fragment_first_included_by_another_comes_in_there(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "lib/one.lua": "local function one() return 1 end\n",
            "lib/two.lua": "--#include lib/one.lua\nlocal function two() return one() end\n",
            "main.lua": "--#include lib/two.lua\n--#include lib/one.lua\nreturn two()\n",
        },
    )
    text = scripts.assemble("main.lua", root)
    assert text.count("local function one()") == 1
    assert text.index("local function one()") < text.index("local function two()")


def test_a_missing_fragment_fails_naming_it_and_who_included_it(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {"lib/two.lua": "--#include lib/gone.lua\n", "main.lua": "--#include lib/two.lua\n"},
    )
    with pytest.raises(scripts.ScriptError, match=r"'lib/gone\.lua' not found .*lib/two\.lua"):
        scripts.assemble("main.lua", root)


def test_an_include_cycle_fails_naming_it(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "lib/a.lua": "--#include lib/b.lua\n",
            "lib/b.lua": "--#include lib/a.lua\n",
            "main.lua": "--#include lib/a.lua\n",
        },
    )
    with pytest.raises(scripts.ScriptError, match=r"cycle: main\.lua -> lib/a\.lua -> lib/b\.lua"):
        scripts.assemble("main.lua", root)


def test_a_mistyped_directive_fails_instead_of_passing_as_a_comment(tmp_path: Path) -> None:
    root = _write(tmp_path, {"lib/one.lua": "", "main.lua": "--#incldue lib/one.lua\n"})
    with pytest.raises(scripts.ScriptError, match=r"main\.lua: not a directive"):
        scripts.assemble("main.lua", root)
