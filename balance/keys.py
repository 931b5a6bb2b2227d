"""Every Redis key format of the service, in one place.

All keys of one account share the hash tag ``{a:ID}``: a Redis Cluster keeps them in one slot, so
one Lua script sees all of an account at once, and accounts spread evenly over the cluster.
"""

from __future__ import annotations

from typing import Final

DAY_S: Final = 86_400
#: Applied-event memory is bucketed by the UTC day of the event's own time and kept this long
#: after that day ends (and at least a day after its last write).
DEDUP_KEEP_S: Final = 2 * DAY_S
#: Redis's memory of an event is trusted to be complete only for events younger than this.
#: Older events are checked against the ledger first (see metering.apply).
DEDUP_TRUST_S: Final = DEDUP_KEEP_S - 3_600
#: How long the sweep's provisional marker (a call charged without its hangup, see
#: ``balance/lua/release.lua``) waits in the reservations hash for a late hangup to settle it.
PROVISIONAL_KEEP_S: Final = DAY_S
#: A hangup of a call answered longer ago than this may find its provisional marker dropped
#: (allowing an hour between a call's answer and the sweep's charge): the processor looks the
#: charge up in the ledger and puts the marker back before the debit (``metering.calls``).
PROVISIONAL_LOOKUP_S: Final = PROVISIONAL_KEEP_S - 3_600


def tag(account_id: str) -> str:
    return "{a:" + account_id + "}"


def account(account_id: str) -> str:
    """Hash: ``bal res cl lowth st seq cur`` (money in micro-units), and ``min``: the minute
    bucket of included seconds (grants ``id,remaining_s,valid_from,expires_at`` joined by
    ``;``, see ``rating/plans.py``). A field, not a key of its own, so the debit reads it
    with the HMGET it already does. Auto-recharge: ``rth`` the threshold (present only while
    it is on), ``rq`` the seq of the open trigger (see ``recharge_settings.lua``); ``hr`` the
    reason of a hold the service pinned (e.g. ``recharge_cap``). Concurrent calls: ``mc`` the
    plan's limit (absent: no limit), ``lc`` the account's live calls, inbound and outbound
    (absent: not counted yet; ``lua/lib/calls.lua`` says who moves it)."""
    return tag(account_id)


# The names of an account's other keys: its account key (the tag) and one of these suffixes.
# The Lua scripts take them from here too: balance/scripts.py writes them into the generated
# fragment lib/keys.lua, so no script spells a key name itself.
#: Applied events of one UTC day: the suffix, then the day number.
APPLIED_SUFFIX: Final = ":ev:"
OUTBOX_SUFFIX: Final = ":out"
CREDITS_SUFFIX: Final = ":cr"
RESERVATIONS_SUFFIX: Final = ":rsv"
HOLDERS_SUFFIX: Final = ":rsvh"


def applied(account_id: str, day: int) -> str:
    """Applied events whose time falls on UTC day ``day``: field = 16-byte event key,
    value = ``amount|fp`` (the amount debited, the 8-byte content fingerprint)."""
    return f"{tag(account_id)}{APPLIED_SUFFIX}{day}"


def outbox(account_id: str) -> str:
    """List of signals not yet acknowledged as published: ``seq|type|reason``, in seq order."""
    return tag(account_id) + OUTBOX_SUFFIX


def credits(account_id: str) -> str:
    """Hash of applied credit ids (payments, adjustments): field = credit key, value = amount."""
    return tag(account_id) + CREDITS_SUFFIX


def reservations(account_id: str) -> str:
    """Hash of live reservations: field = call_id, value = see ``balance/lua/reserve.lua``."""
    return tag(account_id) + RESERVATIONS_SUFFIX


def holders(account_id: str) -> str:
    """Hash indexing the reservations that may hold minute-bucket seconds: field = call_id
    (value "1") of every live reservation and every closed one still holding seconds, plus
    the field "" (the index exists, even empty); kept only while the account's bucket gives
    seconds. ``balance/lua/lib/free_seconds.lua`` keeps it and says why."""
    return tag(account_id) + HOLDERS_SUFFIX


def wait_mark(account_id: str) -> str:
    """A string that one script sets and deletes right before a ``WAIT`` (``balance.pipeline``):
    a write the node replicates, so the ``WAIT`` covers every earlier write of that node. Under
    the account's hash tag, so it goes to the node of the account's calls; no one ever sees it
    (the script is atomic, and replicas apply its two writes as one transaction)."""
    return tag(account_id) + ":wait"


#: Sorted set of every live reservation, ``account_id NUL call_id`` scored by when it expires.
#: Global (no hash tag): it is only ever used by single-key commands, never inside a script,
#: so it is safe on a cluster; the sweep reads it to release reservations whose hangup was lost.
RESERVATION_EXPIRY: Final = "meter:rsv:expiry"

#: Set of accounts that may have signals in their outbox not yet published: added to before a
#: script can queue one (so a crash cannot hide it), emptied by the outbox relay.
OUTBOX_PENDING: Final = "meter:outbox:pending"
