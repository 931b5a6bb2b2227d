"""Which accounts one debit script call carries: by hash slot on a Redis Cluster.

Every key of an account shares its hash tag (``balance.keys.tag``), hence one slot; a script
call's keys must all be in one slot on a cluster (redis-py refuses the call otherwise, and
``debit.lua`` reaches each account's other keys from its account key, which Redis allows only
within the call's slot). So on a cluster a batch's accounts are grouped by slot, and each group
is cut into calls of at most ``max_per_call`` accounts; on one node they are cut in their
order, as they come. The calls then go in one pipelined round trip either way (on a cluster,
redis-py's cluster pipeline sends each node its own calls, all nodes at once).
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.crc import key_slot

from balance import keys


def slot(account_id: str) -> int:
    """The cluster hash slot (0..16383) of every key of ``account_id``."""
    return key_slot(keys.tag(account_id).encode())


def calls(account_ids: Sequence[str], max_per_call: int, *, by_slot: bool) -> list[list[str]]:
    """``account_ids`` cut into script calls of at most ``max_per_call`` accounts each: in their
    order on one node; ``by_slot``, each call of one slot's accounts (slots in order of first
    appearance, accounts in their order within a slot)."""
    if max_per_call < 1:
        raise ValueError("max_per_call must be >= 1")
    if not by_slot:
        return [
            list(account_ids[i : i + max_per_call])
            for i in range(0, len(account_ids), max_per_call)
        ]
    groups: dict[int, list[str]] = {}
    for a in account_ids:
        groups.setdefault(slot(a), []).append(a)
    return [
        group[i : i + max_per_call]
        for group in groups.values()
        for i in range(0, len(group), max_per_call)
    ]
