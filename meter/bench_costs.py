"""``meter bench metering``'s per-event costs: what one event costs each process, measured.

Around a phase of the bench (the baseline loop, the hot path) a ``CostMeter`` reads, before
and after, what each side has spent, and divides the differences by the events of the phase:

- ``python_cpu_us``: this process's CPU time (user + system, ``time.process_time``): the
  loop's own Python, its clients (aiokafka, redis-py, asyncpg) included;
- ``redis_script_us``: the server time Redis reports for script calls (INFO commandstats
  ``cmdstat_evalsha`` + ``cmdstat_eval`` ``usec``: the Lua and the commands it calls, without
  reading the request or writing the reply);
- ``redis_commands``: the commands run inside those scripts and on their own (every
  ``cmdstat_*`` but the script calls themselves): the keys touched per event;
- ``redis_cpu_us``: Redis's CPU time (INFO cpu ``used_cpu_user`` + ``used_cpu_sys``):
  everything, its networking included;
- ``pg_cpu_us``: the CPU time of the PostgreSQL server's processes (the postmaster and every
  child, from ``/proc``; only for a server on this machine, else absent): the backends, the
  WAL writer, the checkpointer (a process that exits during the phase takes its time along);
- ``pg_wal_bytes``: the WAL PostgreSQL wrote (``pg_current_wal_lsn()``), full-page images
  included: the ledger's write cost as the disk sees it.

A figure that cannot be read (a Redis Cluster, a remote PostgreSQL) is left out, never zero.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio.cluster import RedisCluster

from infra.redisclient import RedisClient

_SCRIPT_STATS = ("cmdstat_evalsha", "cmdstat_eval")


@dataclass(frozen=True, slots=True)
class _Reading:
    cpu_s: float
    script_us: float | None
    commands: int | None
    redis_cpu_s: float | None
    pg_cpu_s: float | None
    wal_lsn: int | None  # bytes of WAL since 0/0


class CostMeter:
    """Reads the costs of one phase (``start``, then ``per_event``); see the module docstring."""

    def __init__(self, redis: RedisClient, pool: asyncpg.Pool) -> None:
        self._redis = redis
        self._pool = pool
        self._start: _Reading | None = None
        self._pg_root: int | None = None

    async def start(self) -> None:
        self._pg_root = await self._postmaster()
        self._start = await self._read()

    async def per_event(self, events: int, prefix: str = "") -> dict[str, float]:
        """The phase's costs per event since ``start``, named ``<prefix><cost>_per_event``."""
        assert self._start is not None, "start() first"
        a, b = self._start, await self._read()
        n = max(events, 1)
        out: dict[str, float] = {"python_cpu_us": (b.cpu_s - a.cpu_s) * 1e6 / n}
        if a.script_us is not None and b.script_us is not None:
            out["redis_script_us"] = (b.script_us - a.script_us) / n
        if a.commands is not None and b.commands is not None:
            out["redis_commands"] = (b.commands - a.commands) / n
        if a.redis_cpu_s is not None and b.redis_cpu_s is not None:
            out["redis_cpu_us"] = (b.redis_cpu_s - a.redis_cpu_s) * 1e6 / n
        if a.pg_cpu_s is not None and b.pg_cpu_s is not None:
            out["pg_cpu_us"] = (b.pg_cpu_s - a.pg_cpu_s) * 1e6 / n
        if a.wal_lsn is not None and b.wal_lsn is not None:
            out["pg_wal_bytes"] = (b.wal_lsn - a.wal_lsn) / n
        digits = {"redis_commands": 2, "pg_wal_bytes": 0}
        return {f"{prefix}{k}_per_event": round(v, digits.get(k, 2)) for k, v in out.items()}

    async def _read(self) -> _Reading:
        script_us: float | None = None
        commands: int | None = None
        redis_cpu: float | None = None
        if not isinstance(self._redis, RedisCluster):
            stats: dict[str, Any] = await self._redis.info("commandstats")
            script_us = sum(float(stats.get(k, {}).get("usec", 0)) for k in _SCRIPT_STATS)
            commands = sum(
                int(v.get("calls", 0))
                for k, v in stats.items()
                if k.startswith("cmdstat_") and k not in _SCRIPT_STATS and isinstance(v, dict)
            )
            cpu: dict[str, Any] = await self._redis.info("cpu")
            redis_cpu = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        wal: int | None = None
        with contextlib.suppress(asyncpg.PostgresError):
            wal = int(
                await self._pool.fetchval(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
                )
            )
        return _Reading(time.process_time(), script_us, commands, redis_cpu, self._pg_cpu(), wal)

    async def _postmaster(self) -> int | None:
        """The pid of the local PostgreSQL server's postmaster, from a backend's; None when
        the server is not on this machine (or ``/proc`` cannot tell)."""
        pid = int(await self._pool.fetchval("SELECT pg_backend_pid()"))
        stat = _stat(pid)
        if stat is None or stat[0] != "postgres":
            return None
        # The same pid on this machine could be another server's: the postmaster runs in its
        # data directory.
        try:
            data_dir = str(await self._pool.fetchval("SHOW data_directory"))
            if not _runs_in(stat[1], data_dir):
                return None
        except asyncpg.PostgresError:
            return None
        return stat[1]

    def _pg_cpu(self) -> float | None:
        root = self._pg_root
        if root is None:
            return None
        total = 0.0
        found = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            stat = _stat(int(entry.name))
            if stat is not None and (int(entry.name) == root or stat[1] == root):
                found = True
                total += stat[2]
        return total if found else None


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _runs_in(pid: int, directory: str) -> bool:
    try:
        return os.path.realpath(f"/proc/{pid}/cwd") == os.path.realpath(directory)
    except OSError:
        return False


def _stat(pid: int) -> tuple[str, int, float] | None:
    """A process's name, parent pid and CPU seconds (user + system) from ``/proc/PID/stat``;
    None when it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ... utime stime ...": comm may hold spaces and parentheses
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) * _TICK_S
