"""One round trip of many commands (a redis-py pipeline), errors mapped by ``balance.errors``.

On a Redis Cluster the pipeline is redis-py's cluster pipeline (``infra.redisclient``): it sends
each node its commands in one round trip, all nodes at once, so a batch across slots is still
one round trip's time; each command (each script call) must keep to one slot.

Waiting for replicas (``ReplicaWait``): Redis replicates asynchronously, so a write a primary
acknowledged can be missing on the replica that takes over when it dies. With a wait, the
round trip ends, on every node its script calls went to, with a mark (``_MARK``: a script
that sets and deletes a key of that node, ``balance.keys.wait_mark``) and then
``WAIT replicas timeout_ms``, both routed to that node: redis-py sends each node's commands
on one connection, in order (a single node's pipeline has one connection), so both ride the
connection that carried the node's calls, after them. ``WAIT`` counts the replicas that
acknowledged its connection's last write, and the mark makes that the node's latest write:
so the count covers the calls and everything the node wrote before them. (Without the mark, a
replay whose first try had applied it all over another connection writes nothing, and its
``WAIT`` would wait for nothing where Redis moves a connection's offset only for a command that
propagated something, as 7.2's source reads. The Redis 7.0.15 the tests run here moves it at
every command, reads too, so there the mark changes nothing: seen here.)

The round trip raises ``NotReplicated`` when a node's ``WAIT`` counted fewer replicas than
asked, answered anything but a count or an error, or when a cluster's layout changed during
the round trip: a call redirected to another node (``MOVED``) wrote where no ``WAIT`` counted,
and a round trip redis-py sent again after re-reading the layout re-sends a ``WAIT`` without
its node. Not seen: a call redirected by ``ASK`` (a slot being migrated, resharding), which
leaves the layout as it was.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ResponseError, SlotNotCoveredError

from balance.errors import NotReplicated, call
from infra.redisclient import RedisClient

#: A write the node replicates (to the key it is given, which nothing else uses) that leaves
#: nothing behind: replicas apply a script's writes as one transaction.
_MARK: Final = "redis.call('SET', KEYS[1], '1')\nredis.call('DEL', KEYS[1])\nreturn false"

#: How redis-py names the command of a pipeline's error (one node's and a cluster's alike).
_WAIT_FAILED: Final = re.compile(r"Command # \d+ \(WAIT ")


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """Wait for ``replicas`` replicas of every node a round trip wrote to, at most
    ``timeout_ms`` each (see the module docstring); ``mark`` is ``_MARK`` registered on the
    round trips' client (``for_client``)."""

    replicas: int
    timeout_ms: int
    mark: AsyncScript

    @classmethod
    def for_client(cls, client: RedisClient, replicas: int, timeout_ms: int) -> ReplicaWait | None:
        """The wait for round trips on ``client``; None when ``replicas`` is 0 (off)."""
        if replicas < 0 or timeout_ms < 1:
            raise ValueError("a wait is for replicas >= 0 (0: none), at most timeout_ms >= 1")
        if replicas == 0:
            return None
        return cls(replicas, timeout_ms, client.register_script(_MARK))


class _Routes:
    """The node of each mark's slot by ``client``'s layout now, a mark for each node, and
    whether that layout held (redis-py routes by the same table)."""

    def __init__(self, client: RedisCluster, marks: Sequence[str]) -> None:
        self._table = client.nodes_manager.slots_cache
        self._slots: dict[int, str] = {}
        self.nodes: dict[str, tuple[str, ClusterNode]] = {}  # node name -> (a mark, the node)
        for mark in marks:
            slot = key_slot(mark.encode())
            if slot in self._slots:
                continue
            owners = self._table.get(slot)
            if not owners:
                raise SlotNotCoveredError(f"slot {slot} is not covered by the cluster")
            node = owners[0]
            self._slots[slot] = node.name
            self.nodes.setdefault(node.name, (mark, node))

    def held(self, client: RedisCluster) -> bool:
        table = client.nodes_manager.slots_cache
        return table is self._table and all(
            (owners := table.get(slot)) is not None and owners[0].name == name
            for slot, name in self._slots.items()
        )


async def execute(pipe: Pipeline) -> list[Any]:
    """``pipe.execute()``, always giving the connection back: redis-py checks scripts
    (SCRIPT EXISTS) before its own cleanup, so an error or a cancellation there (a deadline)
    would otherwise leak the connection, and a few hundred leaks empty the pool."""
    try:
        return await pipe.execute()
    finally:
        await pipe.reset()  # type: ignore[no-untyped-call]


async def round_trip(
    client: RedisClient,
    what: str,
    build: Callable[[Pipeline], Awaitable[None]],
    *,
    wait: ReplicaWait | None = None,
    marks: Sequence[str] = (),
) -> list[Any]:
    """The replies of the commands ``build`` queues on a fresh pipeline, in one round trip
    (not a transaction). ``build`` runs again if the round trip is sent again (``NOSCRIPT``,
    see ``balance.errors.call``), so it must only queue commands.

    With ``wait``, ``marks`` holds a key in the slot of each script call ``build`` queues
    that may write (``balance.keys.wait_mark`` of one of its accounts; on one node any one
    will do): the round trip ends with the mark and ``WAIT`` on each node of those slots, and
    raises ``NotReplicated`` unless every ``WAIT`` counted ``wait.replicas`` (see the module
    docstring). The replies are still those of ``build``'s commands only."""

    async def send() -> list[Any]:
        # A cluster's pipeline is typed as a single node's for ``build``: it queues the same
        # commands, and redis-py types ``AsyncScript(client=...)`` to take a Redis (a
        # Pipeline) only, though all it does with it is queue EVALSHA.
        pipe = cast(Pipeline, client.pipeline(transaction=False))
        await build(pipe)
        if wait is None or not marks:
            return await execute(pipe)
        routes = None
        if isinstance(client, RedisCluster):
            await client.initialize()  # the layout the pipeline routes by (a no-op once read)
            routes = _Routes(client, marks)
        targets: list[tuple[str, ClusterNode | None]] = (
            list(routes.nodes.values()) if routes is not None else [(marks[0], None)]
        )
        for mark, node in targets:
            await wait.mark(keys=[mark], client=pipe)
            if node is None:
                pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms)
            else:
                pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms, target_nodes=node)
        try:
            replies = await execute(pipe)
        except ResponseError as exc:
            if _WAIT_FAILED.match(str(exc)):  # e.g. a primary turned replica meanwhile
                raise NotReplicated(f"{what}: not known to be on a replica: {exc}") from exc
            raise
        tail = len(replies) - 2 * len(targets)
        if routes is not None and not routes.held(cast(RedisCluster, client)):
            raise NotReplicated(
                f"{what}: the cluster's layout changed during the round trip, so a WAIT may"
                " have counted another node's replicas"
            )
        for (_, node), count in zip(targets, replies[tail + 1 :: 2], strict=True):
            where = "the node" if node is None else node.name
            if type(count) is not int:
                raise NotReplicated(f"{what}: WAIT on {where} answered {count!r}, not a count")
            if count < wait.replicas:
                raise NotReplicated(
                    f"{what}: {count} of {wait.replicas} replicas of {where} acknowledged"
                    f" it within {wait.timeout_ms} ms"
                )
        return replies[:tail]

    return await call(what, send)
