"""Hangups and messages into charges: the per-event loop of the hot path.

Each charged event is rated with the price-list versions in force at its own time (a call's,
at its ``answered_at``), by the account's price list from the catalog the batch resolved. A
call may draw on included minutes or bundle seconds: it carries its ``draw`` and ``debit.lua``
decides how much of it is covered (``metering.apply``). Number fees are rated in
``metering.numbers``, by the same debit path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from balance.keys import DAY_S
from balance.values import Draw
from contracts.events import MIN_EVENT_TIME, CallHangupData, MessageSentData
from infra.ledger import event_key
from metering.batch import Charge, Record, Rejected
from metering.decode import HangupData, MessageData
from metering.validate import Chargeable, future, too_early, unknown_account
from rating.catalog import AccountRating
from rating.rating import NoRate, voice_cost

_blake2b = hashlib.blake2b


def fingerprint(value: bytes) -> bytes:
    """8 bytes of BLAKE2b over the record's bytes. A redelivery from Kafka is byte-identical;
    the same (source, id) with other bytes is dead-lettered, never charged again."""
    return _blake2b(value, digest_size=8).digest()


def rate(
    parsed: list[tuple[Record, Chargeable]],
    *,
    get: Callable[[str], AccountRating | None],
    latest: float,
    rejected: list[Rejected],
) -> list[Charge]:
    """The charges of the validated hangups and messages in ``parsed``, in order; each one that
    cannot be charged is appended to ``rejected`` instead. ``get`` is the batch's resolved
    catalog; ``latest`` the latest time an event may carry (now + the clock skew allowed)."""
    charges: list[Charge] = []
    append = charges.append
    for rec, ev in parsed:
        epoch = int(ev.time.timestamp())
        if epoch > latest:
            rejected.append(future(rec, ev))
            continue
        if epoch < MIN_EVENT_TIME:
            rejected.append(too_early(rec, ev, "time", ev.time))
            continue
        acct = get(ev.subject)
        if acct is None:
            rejected.append(unknown_account(rec, ev))
            continue
        plist = acct.price_list
        draw: Draw | None = None
        # Typed locals rather than typing.cast, which is a call per event; ev.type decides.
        if ev.type == "call.hangup":
            d: HangupData | CallHangupData = ev.data  # type: ignore[assignment]
            # Rated with the versions in force when the call was answered.
            at = int(d.answered_at.timestamp())
            if at < MIN_EVENT_TIME:
                rejected.append(too_early(rec, ev, "answered_at", d.answered_at))
                continue
            if d.ended_at.timestamp() > latest:  # answered_at <= ended_at: checked first
                rejected.append(future(rec, ev, "ended_at", d.ended_at))
                continue
            try:
                voice = plist.voice_rate(d.direction, d.to, at)
            except NoRate as exc:
                rejected.append(
                    Rejected(
                        record=rec, reason="no_rate_for_destination", detail=str(exc), type=ev.type
                    )
                )
                continue
            amount, billed = voice_cost(d.billable_s, voice)
            if billed:  # any account may hold bundle seconds: debit.lua decides the draw
                draw = Draw(billed, voice.rate_per_min, voice.connect_fee, at)
            kind, qty, ref, call = "call", billed, d.call_id, d.call_id
            from_party, to_party = d.from_, d.to
            direction: str = d.direction
            groups = acct.groups
            group = (
                ""
                if groups is None
                else groups.of_call(direction, d.from_, d.to, d.outbound_profile_id)
            )
        else:
            at = 0
            direction = ""
            m: MessageData | MessageSentData = ev.data  # type: ignore[assignment]
            amount = plist.rate_message(m.parts, epoch)
            kind, qty, ref, call = "sms", m.parts, m.message_id, ""
            from_party, to_party = m.from_, m.to
            group = "" if acct.groups is None else acct.groups.of_message(m.from_)
        append(
            Charge(
                record=rec,
                type=ev.type,
                account_id=ev.subject,
                event_key=event_key(ev.source, ev.id),
                # the value is not None: checked in validation
                fingerprint=_blake2b(rec.value, digest_size=8).digest(),  # type: ignore[arg-type]
                amount=amount,
                kind=kind,
                quantity=qty,
                ref=ref,
                rate_ref=plist.id,
                time=ev.time,
                epoch=epoch,
                day=epoch // DAY_S,
                call_id=call,
                answered_at=at,
                billing_group=group,
                direction=direction,
                from_party=from_party,
                to_party=to_party,
                source=ev.source,
                event_id=ev.id,
                draw=draw,
            )
        )
    return charges
