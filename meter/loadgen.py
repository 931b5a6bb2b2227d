"""Open-loop HTTP/1.1 load for the benchmarks, on keep-alive loopback connections.

Open loop: request ``i`` is *meant* to leave at ``t0 + i / rate`` whatever happened to the ones
before it, and its latency is measured from that intended time, not from when it actually left.
A server that stalls for 50 ms therefore shows 50 ms of latency on every request that should
have gone out meanwhile (coordinated omission corrected, as wrk2 does), instead of one slow
request among few.

The generator must cost little next to the server it measures, on the same small machine: it
writes pre-encoded request bytes straight to asyncio transports and parses responses in
``data_received`` (status line and ``content-length`` only), with no HTTP client, no stream
objects and no task per request. The event loop's timers have millisecond resolution (a shorter
``asyncio.sleep`` under uvloop returns at once, so pacing with it spins a core), so a pacing
thread sleeps until each request is due (``time.sleep``: tens of microseconds of slack) and
wakes the loop, which sends every request then due; a response arriving also sends what is due.
How late each request left (``delay``: the generator's own lateness, or the wait for a free
connection while all are busy) is reported, so that share of a latency figure is known rather
than guessed.
"""

from __future__ import annotations

import asyncio
import gc
import math
import sys
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast


@dataclass(frozen=True, slots=True)
class StepResult:
    """One run at a fixed rate. Latencies in seconds, sorted; unanswered requests count as
    infinitely slow in the percentiles."""

    rate: float
    scheduled: int
    ok: int  # 2xx answers
    errors: int  # other answers
    unanswered: int  # no answer before the drain timeout, or connection lost
    marked: int  # 2xx answers whose body contains ``marker``
    latencies: list[float]
    delay: list[float]  # how late each request left (see the module docstring), sorted
    elapsed_s: float

    def percentile(self, q: float) -> float:
        """Latency at quantile ``q`` (0.99 for p99) over every scheduled request."""
        n = self.scheduled
        if n == 0:
            return math.nan
        rank = max(1, math.ceil(q * n))
        if rank > len(self.latencies):
            return math.inf
        return self.latencies[rank - 1]

    def delay_percentile(self, q: float) -> float:
        if not self.delay:
            return math.nan
        return self.delay[min(len(self.delay) - 1, max(0, math.ceil(q * len(self.delay)) - 1))]


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.buf = b""
        self.busy = -1  # index of the request in flight
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            if at < 0:
                length = 0  # the server under test always sends content-length
            else:
                eol = head.find(b"\r\n", at)
                length = int(head[at + 15 : eol if eol >= 0 else end])
            total = end + 4 + length
            if len(buf) < total:
                break
            status = int(head[9:12])
            self.run.answered(self, status, buf[end + 4 : total])
            buf = buf[total:]
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.lost(self)


class _Run:
    def __init__(self, requests: Sequence[bytes], rate: float, marker: bytes | None) -> None:
        self.reqs = requests
        self.n = len(requests)
        self.rate = rate
        self.marker = marker
        self.t0 = 0.0
        self.next = 0
        self.idle: list[_Conn] = []
        self.sent = array("d", bytes(8 * self.n))
        self.done = array("d", bytes(8 * self.n))
        self.ok = self.errors = self.lost_n = self.marked = self.finished = 0
        self.all_done = asyncio.Event()

    def pump(self) -> None:
        """Send every request that is due, while a connection is free."""
        now = time.perf_counter()
        due = min(self.n, int((now - self.t0) * self.rate) + 1)
        idle = self.idle
        while self.next < due and idle:
            conn = idle.pop()
            i = self.next
            self.next = i + 1
            conn.busy = i
            self.sent[i] = now
            assert conn.transport is not None
            conn.transport.write(self.reqs[i])

    def answered(self, conn: _Conn, status: int, body: bytes) -> None:
        i = conn.busy
        if i < 0:
            return  # an answer nobody asked for: ignore it
        self.done[i] = time.perf_counter()
        if 200 <= status < 300:
            self.ok += 1
            if self.marker is not None and self.marker in body:
                self.marked += 1
        else:
            self.errors += 1
        conn.busy = -1
        self.idle.append(conn)
        self._finish_one()
        self.pump()

    def lost(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy >= 0:
            conn.busy = -1
            self.lost_n += 1
            self._finish_one()

    def _finish_one(self) -> None:
        self.finished += 1
        if self.finished == self.n:
            self.all_done.set()


async def run_step(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    *,
    connections: int = 64,
    drain_s: float = 5.0,
    marker: bytes | None = None,
) -> StepResult:
    """Send ``requests`` (complete HTTP/1.1 requests, keep-alive) at ``rate`` per second.

    ``connections`` bounds the requests in flight: a request due while all are busy waits for
    one, and that wait is part of its latency. Requests not answered within ``drain_s`` of the
    last one's intended time are counted ``unanswered``.
    """
    run = _Run(requests, rate, marker)
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(connections):
        _, c = await loop.create_connection(lambda: _Conn(run), host, port)
        conns.append(c)
    run.idle = list(conns)
    all_sent = asyncio.Event()
    stop = threading.Event()

    def pace() -> None:
        k = 0
        while k < run.n:
            wait = run.t0 + k / rate - time.perf_counter()
            if wait > 0 and stop.wait(wait):
                return  # the run was abandoned
            loop.call_soon_threadsafe(run.pump)
            # The next wake-up: the first request not due yet.
            k = max(k + 1, int((time.perf_counter() - run.t0) * rate) + 1)
        loop.call_soon_threadsafe(all_sent.set)

    gc.collect()
    gc.disable()  # a collection in the generator would show up as server latency
    switch = sys.getswitchinterval()
    # The pacing thread must get the GIL at once when its time comes, not after 5 ms.
    sys.setswitchinterval(0.0002)
    pacer = threading.Thread(target=pace, name="loadgen-pacer", daemon=True)
    try:
        run.t0 = time.perf_counter()
        pacer.start()
        await all_sent.wait()  # all due; those still waiting for a connection go as answers come
        end_of_schedule = run.t0 + (run.n - 1) / rate
        left = end_of_schedule + drain_s - time.perf_counter()
        if run.finished < run.n and left > 0:
            try:
                async with asyncio.timeout(left):
                    await run.all_done.wait()
            except TimeoutError:
                pass
        elapsed = time.perf_counter() - run.t0
    finally:
        stop.set()
        await asyncio.to_thread(pacer.join)
        sys.setswitchinterval(switch)
        gc.enable()
        for c in conns:
            if c.transport is not None:
                c.transport.close()
    interval = 1.0 / rate
    latencies = []
    delay = []
    for i in range(run.next):
        if run.done[i]:
            intended = run.t0 + i * interval
            latencies.append(run.done[i] - intended)
            delay.append(max(0.0, run.sent[i] - intended))
    latencies.sort()
    delay.sort()
    return StepResult(
        rate,
        run.n,
        run.ok,
        run.errors,
        run.n - run.ok - run.errors,
        run.marked,
        latencies,
        delay,
        elapsed,
    )
