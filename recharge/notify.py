"""Telling an account's owner what happened to a payment: the ``billing.notifications`` events.

Best effort by design: the payment row is the record, and a lost notification is logged, never
retried (``send`` swallows the error so a broker outage cannot undo a settled payment).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from contracts.money import format_money
from contracts.payments import Notification, NotificationData, NotificationType
from recharge.payments import Payment

log = logging.getLogger(__name__)


class Notifier(Protocol):
    async def notify(self, notification: Notification) -> None: ...


class LogNotifier:
    """Notifications as log lines: for a process without a broker (the API, whose caller
    hears the outcome of a top-up in the answer)."""

    async def notify(self, notification: Notification) -> None:
        log.info("%s %s: %s", notification.type, notification.subject, notification.data.message)


def notification(
    type_: NotificationType,
    account_id: str,
    p: Payment | None,
    reason: str,
    message: str,
    at: datetime,
) -> Notification:
    """The event for ``p`` (None: about the account, no payment). Its id is stable per
    account, type and payment, so a consumer can drop a repeat."""
    ident = f"{account_id}:{type_}:{p.id if p else at.isoformat()}"
    amount = None
    if p is not None:
        amount = p.captured if p.status == "succeeded" else p.amount
    return Notification(
        id=ident,
        type=type_,
        time=at,
        subject=account_id,
        data=NotificationData(
            account_id=account_id,
            payment_id=p.id if p else None,
            amount=None if amount is None else format_money(amount),  # type: ignore[arg-type]
            reason=reason,
            message=message,
        ),
    )


async def send(notifier: Notifier, n: Notification) -> None:
    """Best effort: the payment row is the record; a lost notification is logged."""
    try:
        await notifier.notify(n)
    except Exception:
        log.exception("notification %s lost", n.id)


class Notices:
    """Sends the notifications of one service, timed by its clock; best effort (``send``)."""

    def __init__(self, notifier: Notifier, clock: Callable[[], datetime]) -> None:
        self._notifier = notifier
        self._clock = clock

    async def __call__(
        self,
        type_: NotificationType,
        account_id: str,
        p: Payment | None,
        reason: str,
        message: str,
    ) -> None:
        n = notification(type_, account_id, p, reason, message, self._clock())
        await send(self._notifier, n)
