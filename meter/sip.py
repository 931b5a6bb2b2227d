"""Kamailio and SIPp as processes, on loopback ports of their own: the switch of
``tests/deploy/test_kamailio.py`` and ``meter demo --sip``.

Kamailio runs ``deploy/kamailio/kamailio.cfg`` in the foreground (``-DD -E``) with the
service's URL, a service key (``SWITCH_API_KEY`` in its environment) and the callee as its
next hop; SIPp runs ``deploy/sipp/callee.xml`` (one process, every call) and
``deploy/sipp/caller.xml`` (one process per group of calls of the same length), whose log
lines say when each call was answered and who ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx

REPO: Final = Path(__file__).resolve().parent.parent
KAMAILIO_CFG: Final = REPO / "deploy" / "kamailio" / "kamailio.cfg"
SIPP_DIR: Final = REPO / "deploy" / "sipp"
#: The Debian packages that bring what the config loads.
PACKAGES: Final = (
    "kamailio",
    "kamailio-utils-modules",
    "kamailio-json-modules",
    "kamailio-extra-modules",
    "sip-tester",
)
_MODULES: Final = ("dialog.so", "http_client.so", "jansson.so", "xhttp.so", "jsonrpcs.so")
#: The caller scenario's own hangup, in ms: the literal the scenario's BYE wait carries.
_HOLD: Final = 'timeout="20000"'


def module_dir() -> Path | None:
    """Where Debian put Kamailio's modules (``/usr/lib/<multiarch>/kamailio/modules``)."""
    for tm in sorted(glob.glob("/usr/lib/*/kamailio/modules/tm.so")):
        return Path(tm).parent
    return None


def missing() -> list[str]:
    """What of Kamailio and SIPp this machine lacks (empty: all there)."""
    out = [tool for tool in ("kamailio", "sipp") if shutil.which(tool) is None]
    mods = module_dir()
    if mods is None:
        out.append("kamailio modules")
    else:
        out += [m for m in _MODULES if not (mods / m).exists()]
    return out


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _mkdir(root: Path) -> Path:
    # Small, local file work: sync helpers, so the async code reads as what it waits for.
    root.mkdir(parents=True, exist_ok=True)
    return root


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@dataclass(frozen=True, slots=True)
class Switch:
    """A running Kamailio: where SIP goes, and its JSON-RPC URL (for the bridge)."""

    sip_port: int
    rpc_url: str
    log: Path


@contextlib.asynccontextmanager
async def running_kamailio(
    root: Path, *, api_url: str, service_key: str, next_hop_port: int
) -> AsyncIterator[Switch]:
    """Kamailio on ``root`` (its rundir and log), until the context exits."""
    mods = module_dir()
    if mods is None:
        raise RuntimeError("Kamailio's modules are not installed")
    _mkdir(root)
    sip_port, rpc_port = free_port(socket.SOCK_DGRAM), free_port()
    log = root / "kamailio.log"
    defines = {
        "SIP_LISTEN": f"udp:127.0.0.1:{sip_port}",
        "RPC_PORT": str(rpc_port),
        "METER_API": f'"{api_url}"',
        "NEXT_HOP": f'"sip:127.0.0.1:{next_hop_port}"',
        "RUN_DIR": f'"{root}"',
        "MODULES": f'"{mods}/"',
    }
    args = ["-DD", "-E", "-f", str(KAMAILIO_CFG)]
    for name, value in defines.items():
        args += ["-A", f"{name}={value}"]
    env = {**os.environ, "SWITCH_API_KEY": service_key}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            "kamailio", *args, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{rpc_port}/RPC"
    try:
        await _wait_rpc(proc, url, log)
        yield Switch(sip_port, url, log)
    finally:
        await _stop(proc)


async def _wait_rpc(proc: asyncio.subprocess.Process, url: str, log: Path) -> None:
    body = {"jsonrpc": "2.0", "method": "core.version", "id": 1}
    async with httpx.AsyncClient(timeout=1.0) as http:
        for _ in range(100):
            if proc.returncode is not None:
                break
            try:
                if (await http.post(url, json=body)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    tail = _tail(log)
    raise RuntimeError(f"Kamailio did not come up (exit {proc.returncode}):\n{tail}")


@contextlib.asynccontextmanager
async def running_callee(root: Path) -> AsyncIterator[int]:
    """A SIPp callee answering every call; yields its port."""
    _mkdir(root)
    port = free_port(socket.SOCK_DGRAM)
    with (root / "callee.log").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            "sipp", "-sf", str(SIPP_DIR / "callee.xml"), "-i", "127.0.0.1", "-p", str(port),
            "-nostdin", "-trace_err", "-error_file", str(root / "callee.errors"),
            cwd=root, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        await asyncio.sleep(0.3)
        if proc.returncode is not None:
            raise RuntimeError(f"the SIPp callee exited ({proc.returncode})")
        yield port
    finally:
        await _stop(proc)


@dataclass(slots=True)
class Call:
    """One call as its caller saw it (unix seconds)."""

    call_id: str
    answered: float | None = None
    network_bye: float | None = None  # the switch (its timer, the bridge) ended it
    caller_bye: float | None = None
    denied: str | None = None  # the X-Meter-Deny-Reason of a 402
    refused: str | None = None  # 403, 503

    @property
    def ended(self) -> float | None:
        return self.network_bye or self.caller_bye


@dataclass(slots=True)
class Calls:
    by_id: dict[str, Call] = field(default_factory=dict)

    def line(self, text: str) -> None:
        parts = text.split()
        if len(parts) < 2:
            return
        what, call_id, rest = parts[0], parts[1], parts[2:]
        c = self.by_id.setdefault(call_id, Call(call_id))
        value = rest[0] if rest else ""
        if what == "denied":
            c.denied = value
        elif what == "refused":
            c.refused = value
        elif what in ("answered", "network_bye", "caller_bye") and len(rest) == 2:
            # SIPp prints its variables as floats: seconds, then microseconds
            setattr(c, what, float(rest[0]) + float(rest[1]) / 1e6)


async def place_calls(
    root: Path,
    name: str,
    *,
    switch: Switch,
    accounts: Sequence[str],
    hold_ms: int,
    to: str,
    rate: float = 10.0,
) -> list[Call]:
    """``len(accounts)`` calls, the i-th on ``accounts[i]``, to ``to`` through ``switch``, each
    hung up by its caller after ``hold_ms`` unless the network ends it first."""
    log = _write_group(_mkdir(root), name, accounts, hold_ms)
    n = str(len(accounts))
    with (root / f"{name}.out").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            "sipp", f"127.0.0.1:{switch.sip_port}", "-sf", f"{name}.xml", "-inf", f"{name}.csv",
            "-s", to, "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)),
            "-m", n, "-l", n, "-r", str(rate), "-nostdin",
            "-trace_logs", "-log_file", str(log), "-trace_err",
            "-error_file", str(root / f"{name}.errors"),
            cwd=root, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        await asyncio.wait_for(proc.wait(), hold_ms / 1000 + 120)
    finally:
        await _stop(proc)
    return _read_calls(log)


def _write_group(root: Path, name: str, accounts: Sequence[str], hold_ms: int) -> Path:
    """The group's scenario (the caller's, with its hold) and its accounts; its log's path."""
    scenario = (SIPP_DIR / "caller.xml").read_text()
    if _HOLD not in scenario:
        raise RuntimeError(f"deploy/sipp/caller.xml lost its {_HOLD} hold")
    (root / f"{name}.xml").write_text(scenario.replace(_HOLD, f'timeout="{hold_ms}"'))
    (root / f"{name}.csv").write_text("SEQUENTIAL\n" + "".join(f"{a};\n" for a in accounts))
    return root / f"{name}.lines"


def _read_calls(log: Path) -> list[Call]:
    calls = Calls()
    if log.exists():
        for text in log.read_text(errors="replace").splitlines():
            calls.line(text)
    return list(calls.by_id.values())
