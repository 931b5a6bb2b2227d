"""The rules of payments, as pure functions of values (no I/O; money in integer micro-units).

- Minimum payment: $10, manual or automatic.
- New accounts: payments (manual and automatic together) up to $100 on the account's first
  day, the limit growing by $50 each day after, unless the account has level-2 verification.
  A day is the account's own: day N is ``[created_at + N days, created_at + N+1 days)``, so the
  limit does not depend on a time zone and every account's first day is a full 24 hours.
- Auto-recharge: when available credit falls to or below the threshold, charge what brings
  the *balance* up to ``threshold + recharge_amount`` (rounded up to the cent, at least the
  minimum), at most 10 times in any rolling 24 hours. That cap cannot be lifted. When an
  amount is above what today's limit leaves, the recharge is lowered to what is left; when
  less than the minimum is left, it is refused until the next day of the account.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from contracts.money import format_money

CENT: Final = 10_000
MIN_PAYMENT: Final = 10_000_000
DAY_ONE_LIMIT: Final = 100_000_000
DAILY_GROWTH: Final = 50_000_000
MAX_AUTO_RECHARGES: Final = 10
WINDOW: Final = timedelta(hours=24)
DAY: Final = timedelta(days=1)
#: Ceiling of one payment and of a recharge setting: far below what bigint or a card allows,
#: and a typo of three extra zeros is refused instead of charged.
MAX_PAYMENT: Final = 100_000 * 1_000_000


def round_up_cents(amount: int) -> int:
    return -(-amount // CENT) * CENT


def round_down_cents(amount: int) -> int:
    return amount // CENT * CENT


class PolicyRefusal(Exception):
    """The payment was refused by a rule; nothing was charged. ``code`` is the API error code;
    ``retry_at`` is when the same payment could pass (None: never by waiting)."""

    def __init__(self, code: str, message: str, retry_at: datetime | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_at = retry_at


@dataclass(frozen=True, slots=True)
class AccountTerms:
    created_at: datetime
    verification_level: int  # 2 lifts the new-account limits


def account_day(terms: AccountTerms, now: datetime) -> tuple[int, datetime, datetime]:
    """``(n, start, end)`` of the account's day holding ``now`` (day 0 is its first)."""
    n = max(0, (now - terms.created_at) // DAY)
    start = terms.created_at + n * DAY
    return n, start, start + DAY


def day_limit(terms: AccountTerms, now: datetime) -> int | None:
    """What the account may pay in total during its day holding ``now``; None: no limit."""
    if terms.verification_level >= 2:
        return None
    n, _, _ = account_day(terms, now)
    return DAY_ONE_LIMIT + n * DAILY_GROWTH


def check_amount(amount: int) -> None:
    """A payment's own shape: whole cents, at least the minimum, at most the ceiling."""
    if amount % CENT:
        raise PolicyRefusal(
            "invalid_amount", f"{format_money(amount)} is not a whole number of cents"
        )
    if amount < MIN_PAYMENT:
        raise PolicyRefusal(
            "amount_below_minimum", f"the minimum payment is {format_money(MIN_PAYMENT)}"
        )
    if amount > MAX_PAYMENT:
        raise PolicyRefusal(
            "amount_above_maximum", f"a single payment is at most {format_money(MAX_PAYMENT)}"
        )


def check_manual(amount: int, terms: AccountTerms, paid_today: int, now: datetime) -> None:
    """Refuse a manual top-up of ``amount`` that breaks a rule. ``paid_today``: payments of the
    account's current day that succeeded or may still (pending)."""
    check_amount(amount)
    limit = day_limit(terms, now)
    if limit is not None and paid_today + amount > limit:
        _, _, end = account_day(terms, now)
        left = max(0, limit - paid_today)
        raise PolicyRefusal(
            "payment_limit_exceeded",
            f"this account may pay {format_money(limit)} today and has {format_money(left)} left;"
            " the limit grows by $50.00 a day (level-2 verification lifts it)",
            retry_at=end,
        )


@dataclass(frozen=True, slots=True)
class AutoDecision:
    action: Literal["charge", "refuse"]
    amount: int  # to charge (0 when refused)
    reason: str  # "" | "lowered_to_day_limit" | refusal code
    message: str
    retry_at: datetime | None  # when a refused trigger may be attempted again


def auto_amount(balance: int, threshold: int, recharge: int) -> int:
    """What brings the balance up to ``threshold + recharge``: whole cents, rounded up, and at
    least the minimum payment."""
    return max(MIN_PAYMENT, round_up_cents(threshold + recharge - balance))


def decide_auto(
    *,
    balance: int,
    threshold: int,
    recharge: int,
    terms: AccountTerms,
    recent_auto: Sequence[datetime],
    paid_today: int,
    now: datetime,
) -> AutoDecision:
    """Decide one auto-recharge. ``recent_auto``: creation times of the automatic payments of
    the last 24 hours that succeeded or may still (pending); ``paid_today`` as in
    ``check_manual``."""
    in_window = sorted(t for t in recent_auto if now - WINDOW < t <= now)
    if len(in_window) >= MAX_AUTO_RECHARGES:
        # The window rolls: one more is allowed once the oldest of the last ten is 24 h old.
        retry = in_window[-MAX_AUTO_RECHARGES] + WINDOW
        return AutoDecision(
            "refuse",
            0,
            "recharge_cap_reached",
            f"{MAX_AUTO_RECHARGES} automatic recharges in the last 24 hours; the next is allowed"
            f" at {retry.isoformat()}",
            retry,
        )
    amount = min(auto_amount(balance, threshold, recharge), MAX_PAYMENT)
    limit = day_limit(terms, now)
    if limit is None or paid_today + amount <= limit:
        return AutoDecision("charge", amount, "", "", None)
    left = round_down_cents(limit - paid_today)
    if left >= MIN_PAYMENT:
        return AutoDecision(
            "charge",
            left,
            "lowered_to_day_limit",
            f"lowered from {format_money(amount)} to today's payment limit",
            None,
        )
    _, _, end = account_day(terms, now)
    return AutoDecision(
        "refuse",
        0,
        "payment_limit_exceeded",
        f"today's payment limit of {format_money(limit)} leaves {format_money(max(0, left))},"
        f" below the minimum payment",
        end,
    )
