"""Supervision of the server processes this package spawns: start, readiness, stop, logs.

Every server runs in its own process group with its output appended to a log file under the
caller's root. :func:`start_with_port_retry` spawns a command and polls a readiness check,
retrying on a fresh port when the server dies early after losing the race for a port we
picked; its errors carry the tail of the log. :class:`ProcessHandle` stops the whole group
(SIGTERM, then SIGKILL). Every handle still running is stopped at interpreter exit
(:func:`register`), and Kafka and Redis started from the main thread on Linux also get a
parent-death signal, so they die even with a hard-killed Python.

The helpers here are shared by the service modules of this package (``tansu``,
``redis_server``, ``postgres``); callers outside it use those.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

HOST = "127.0.0.1"
#: Grace period between the polite signal and SIGKILL when stopping a service.
STOP_TIMEOUT_S = 10.0
# A spawned server that dies at once most likely lost the race for its free port
# to another process; that many fresh ports are tried before giving up.
_SPAWN_ATTEMPTS = 3


# --------------------------------------------------------------------------- #
# Registry of everything still running, stopped at interpreter exit.
# --------------------------------------------------------------------------- #


class Stoppable(Protocol):
    """A started service: ``stop()`` is idempotent and waits for the exit."""

    def stop(self) -> None: ...


_live: set[Stoppable] = set()
_live_lock = threading.Lock()


def register(handle: Stoppable) -> None:
    """Have ``handle`` stopped at interpreter exit unless it unregisters itself before."""
    with _live_lock:
        _live.add(handle)


def unregister(handle: Stoppable) -> None:
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
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    tail = "\n".join(text.splitlines()[-lines:])
    return tail or f"<log {path} is empty>"


def pid_alive(pid: int) -> bool:
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


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
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


class ProcessHandle:
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
                unregister(self)

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


def start_with_port_retry(
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
                        f"{service} did not become ready on {HOST}:{chosen} within "
                        f"{timeout:.0f}s; last lines of {log_path}:\n{log_tail(log_path)}"
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
                f"{HOST}:{chosen}; last lines of {log_path}:\n{log_tail(log_path)}"
            )
    raise AssertionError("unreachable")
