"""The scripts' replies, decoded into ``balance.values``.

Each script's reply format is documented at the top of its ``.lua`` file; these functions are
its reading side. A reply that does not decode (a key missing from a table below, a field too
few) is a bug in one side or the other and raises as such (``KeyError``, ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import unquote

from balance.values import (
    AccountOutcome,
    AccountStatus,
    Drawn,
    GrantResult,
    NoStatus,
    PendingSignal,
    PlanPeriod,
    Progress,
    ProgressOutcome,
    Reservation,
    ReservationDecision,
    ReservationReason,
    Settled,
)

_STATUS: Final[dict[bytes, AccountStatus]] = {
    b"active": "active",
    b"low": "low",
    b"hold": "hold",
    b"suspended": "suspended",
}
_STATUS_OR_NONE: Final[dict[bytes, AccountStatus | NoStatus]] = {**_STATUS, b"": ""}
_DECISION: Final[dict[bytes, ReservationDecision]] = {b"allow": "allow", b"deny": "deny"}
_REASON: Final[dict[bytes, ReservationReason]] = {
    b"ok": "ok",
    b"insufficient_credit": "insufficient_credit",
    b"account_on_hold": "account_on_hold",
    b"account_suspended": "account_suspended",
    b"unknown_account": "unknown_account",
    b"concurrent_call_limit": "concurrent_call_limit",
    b"call_closed": "call_closed",
}
_PROGRESS: Final[dict[bytes, ProgressOutcome]] = {
    b"none": "none",
    b"closed": "closed",
    b"ok": "ok",
    b"extended": "extended",
    b"terminate": "terminate",
    b"terminating": "terminating",
}
#: grant.lua's result codes.
GRANT_RESULTS: Final[dict[int, GrantResult]] = {
    1: "applied",
    0: "repeat",
    -1: "unknown_account",
    -2: "insufficient_credit",
}


def status(raw: bytes) -> AccountStatus:
    """An account status as the scripts store it (``st``)."""
    return _STATUS[raw]


def status_or_none(raw: bytes) -> AccountStatus | NoStatus:
    """A status of a reply that says ``""`` for an unknown account."""
    return _STATUS_OR_NONE[raw]


def plan_line(plan: PlanPeriod | None) -> str:
    """A plan allowance as the scripts read it: ``included_s,period_start,period_end``, then
    ``,previous_start`` when the period before counts too (``PlanPeriod.previous_start``)."""
    if not plan:
        return ""
    line = f"{plan.included_s},{plan.period_start},{plan.period_end}"
    return f"{line},{plan.previous_start}" if plan.previous_start else line


def decode_draws(raw: bytes) -> dict[int, Drawn]:
    """``index:amount:drawn`` entries, ``,`` separated."""
    out = {}
    for part in raw.split(b","):
        i, amount, drawn = part.split(b":")
        out[int(i)] = Drawn(int(amount), int(drawn))
    return out


def decode_settled(raw: bytes) -> dict[int, Settled]:
    """``index:charged:charged_at`` entries, ``,`` separated."""
    out = {}
    for part in raw.split(b","):
        i, charged, at = part.split(b":")
        out[int(i)] = Settled(int(charged), int(at))
    return out


def decode_outbox(entries: list[bytes]) -> list[PendingSignal]:
    """``seq|type|reason`` or, for call.terminate, ``seq|type|reason|call_id|terminate_at``, for
    a number's signal ``seq|type|reason|number``."""
    out = []
    for raw in entries:
        seq, type_, rest = raw.decode().split("|", 2)
        if type_.startswith("number."):
            reason, number = rest.split("|", 1)
            out.append(PendingSignal(int(seq), type_, reason, number=number))
        elif type_ == "call.terminate":
            # The call id is percent-escaped by progress.lua (it may hold any character).
            reason, tail = rest.split("|", 1)
            call_id, at = tail.rsplit("|", 1)
            out.append(PendingSignal(int(seq), type_, reason, unquote(call_id), int(at)))
        else:
            out.append(PendingSignal(int(seq), type_, rest))
    return out


def decode_debits(account_ids: Sequence[str], replies: Sequence[bytes]) -> list[AccountOutcome]:
    """debit.lua's replies (one line per account, ``\\n`` separated, tab-separated fields:
    found, balance, status, codes, duplicate amounts, outbox, draws, settled) for
    ``account_ids``, in their order."""
    outcomes: list[AccountOutcome] = []
    i = 0
    for reply in replies:
        for line in reply.split(b"\n"):
            found, bal, st, codes, dups, out, draws, settled = line.split(b"\t")
            account_id = account_ids[i]
            i += 1
            if found == b"0":
                outcomes.append(AccountOutcome(account_id, False))
                continue
            outcomes.append(
                AccountOutcome(
                    account_id,
                    True,
                    int(bal),
                    status(st),
                    codes.decode(),
                    [int(x) for x in dups.split(b",")] if dups else [],
                    decode_outbox(out.split(b";")) if out else [],
                    decode_draws(draws) if draws else {},
                    decode_settled(settled) if settled else {},
                )
            )
    return outcomes


def decode_reservation(reply: Sequence[Any]) -> Reservation:
    """reserve.lua's ``{decision, reason, max_duration_s, reserved, granted_s, expires_at,
    held_s}``."""
    decision, reason, max_d, reserved, granted, expires, held = reply
    return Reservation(
        _DECISION[decision],
        _REASON[reason],
        int(max_d),
        int(reserved),
        int(granted),
        int(expires),
        int(held),
    )


def decode_progress(reply: Sequence[Any]) -> Progress:
    """progress.lua's ``{outcome, until, outbox}``."""
    outcome, until, box = reply
    return Progress(_PROGRESS[outcome], int(until), decode_outbox(box.split(b";")) if box else [])
