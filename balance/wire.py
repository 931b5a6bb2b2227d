"""A lean connection for the authorize API's reservations: RESP packed by hand, replies parsed
by hiredis, ``reserve.lua`` called by its SHA and loaded on ``NOSCRIPT`` only.

Profiled under ``meter bench authorize``, redis-py's pipeline cost the API more CPU than the
rest of a reservation: encoding each argument through its ``Encoder``, a ``SCRIPT EXISTS``
round trip before every pipeline that holds a script, its retry and connection-pool layers.
``ReserveWire`` is one connection of the client's own pool (a single Redis node; a cluster
keeps redis-py's path, see ``wire_for``) carrying whole batches of commands: one write, and the
replies of the batch read back together.

Errors are those of ``balance.errors``, as redis-py's path raises them: a connection lost, or
refused, before a batch's replies came is ``OutcomeUnknown``, after one reconnect and resend
(the same policy as ``infra.instrument.redis_retry``: a reservation is idempotent per call_id,
and the expiry listing is a ``ZADD GT``); an error reply is mapped by ``map_error`` (``StoreBusy``
for "not now", ``Refused`` otherwise), the first of its batch; ``NOSCRIPT`` loads the script and
sends the batch once more. A caller that stops waiting (a deadline, a cancellation) drops the
connection: the next batch opens it again, so no late reply can be read as another's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import hiredis
from redis.asyncio.client import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from balance import keys, replies
from balance.errors import StoreBusy, map_error
from balance.values import PlanPeriod, Reservation, ReservationRequest, Tariff


def pack(*args: bytes | str | int) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else (a.encode() if isinstance(a, str) else b"%d" % a)
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


class ReserveWire:
    """One connection of ``client``'s pool, kept for reservations (see the module docstring):
    redis-py opens it (AUTH, SELECT, TLS as configured) and closes it with the client; batches
    are written to it and their replies read back here, one batch at a time."""

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool
        self._conn: AbstractConnection | None = None
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._lock = asyncio.Lock()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        conn = self._conn
        if conn is None:
            # Checked out for good: the pool closes it with the client (disconnect of in-use
            # connections), and nothing else ever reads from it.
            conn = self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        if not conn.is_connected:
            await conn.connect()
        reader, writer = conn._reader, conn._writer  # redis-py's own streams of it
        if reader is None or writer is None:
            raise RedisConnectionError("connection to Redis closed")
        return reader, writer

    async def _drop(self) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError)
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)

    async def execute(self, packed: bytes, n: int) -> list[Any]:
        """The ``n`` replies of the ``n`` commands in ``packed``, error replies included (as
        ``ResponseError`` values). Raises redis-py's ``ConnectionError`` when the connection
        is lost before they all came, after one reconnect and resend."""
        async with self._lock:
            for attempt in (0, 1):
                try:
                    reader, writer = await self._connection()
                    writer.write(packed)
                    return await self._replies(reader, n)
                except (RedisConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                    await self._drop()
                    if attempt:
                        if isinstance(exc, RedisConnectionError):
                            raise
                        raise RedisConnectionError(f"Redis connection lost: {exc!r}") from exc
                except BaseException:
                    # A caller gave up (a deadline): no late reply may meet the next batch.
                    await self._drop()
                    raise
        raise AssertionError("unreachable")

    async def _replies(self, stream: asyncio.StreamReader, n: int) -> list[Any]:
        parse = self._reader
        out: list[Any] = []
        while True:
            while len(out) < n:
                reply = parse.gets()
                if reply is False:
                    break
                out.append(reply)
            if len(out) == n:
                return out
            data = await stream.read(65_536)
            if not data:
                raise RedisConnectionError("Redis closed the connection")
            parse.feed(data)

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._drop()
            await self._pool.release(self._conn)
            self._conn = None


def wire_for(client: Any) -> ReserveWire | None:
    """A ``ReserveWire`` on ``client``'s pool, or None for a cluster (redis-py's cluster
    pipeline routes by slot; that path stays)."""
    if not isinstance(client, Redis):
        return None
    return ReserveWire(client)


class WireReservations:
    """``reserve_many`` of ``balance.reservations.ReservationStore`` over a ``ReserveWire``:
    the same commands (each call listed for the sweep, then ``reserve.lua``), the same
    answers and errors."""

    def __init__(self, wire: ReserveWire, script: str, sha: str) -> None:
        self._wire = wire
        self._script = script.encode()
        self._sha = sha.encode()

    async def reserve_many(
        self,
        calls: Sequence[ReservationRequest],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        plans: Mapping[str, PlanPeriod],
    ) -> list[Reservation]:
        if not calls:
            return []
        # What every call of the batch shares is packed once: the ZADD's head, EVALSHA's
        # head and the grant parameters; per call, only its own arguments.
        zadd = pack(b"ZADD", keys.RESERVATION_EXPIRY, b"GT", now_s + grant_s + grace_s)
        zadd = b"*5" + zadd[2:]  # one more argument follows: the member
        evalsha = b"*17\r\n" + pack(b"EVALSHA", self._sha, b"2")[4:]
        shared = pack(now_s, grant_s, grace_s, max_s)[4:]
        tariffs: dict[Tariff, bytes] = {}
        out = []
        for c in calls:
            t = c.tariff
            acct = c.account_id
            tariff = tariffs.get(t)
            if tariff is None:
                tariff = tariffs[t] = pack(
                    t.rate_per_min, t.connect_fee, t.initial_s, t.subsequent_s, b"0"
                )[4:]
            plan = plans.get(acct)
            out += [
                zadd,
                _bulk(f"{acct}\x00{c.call_id}".encode()),
                evalsha,
                _bulk(keys.account(acct).encode()),
                _bulk(keys.reservations(acct).encode()),
                _bulk(c.call_id.encode()),
                _bulk(c.direction.encode()),
                shared,
                tariff,
                _bulk(replies.plan_line(plan).encode() if plan else b""),
            ]
        packed = b"".join(out)
        raw = await self._run(packed, 2 * len(calls))
        results = [replies.decode_reservation(r) for r in raw[1::2]]
        limit = now_s + grant_s + grace_s
        fix = [
            pack(b"ZADD", keys.RESERVATION_EXPIRY, r.expires_at, f"{c.account_id}\x00{c.call_id}")
            for c, r in zip(calls, results, strict=True)
            if r.decision == "allow" and r.expires_at < limit
        ]
        if fix:
            await self._run(b"".join(fix), len(fix), what="reservation expiry")
        return results

    async def _run(self, packed: bytes, n: int, *, what: str = "reservation") -> list[Any]:
        try:
            raw = await self._wire.execute(packed, n)
            error = _first_error(raw)
            if error is not None and str(error).startswith("NOSCRIPT"):
                # Redis lost the script (a restart, SCRIPT FLUSH, a failover): load it, and
                # send the batch once more (every command of it is idempotent).
                loaded = await self._wire.execute(pack(b"SCRIPT", b"LOAD", self._script), 1)
                if isinstance(loaded[0], ResponseError):
                    raise loaded[0]
                raw = await self._wire.execute(packed, n)
                error = _first_error(raw)
                if error is not None and str(error).startswith("NOSCRIPT"):
                    raise StoreBusy(f"{what}: Redis lost its scripts again after a reload")
            if error is not None:
                raise error
        except (RedisConnectionError, ResponseError) as exc:
            raise map_error(what, exc) from exc
        return raw


def _first_error(raw: list[Any]) -> ResponseError | None:
    for r in raw:
        if isinstance(r, ResponseError):
            return r
    return None
