"""The recharge rules, pure (``recharge.policy``), at their edges: the minimum payment, the new
account's day limits, level-two verification, the auto-recharge amount, the cap of ten in 24
hours and an auto recharge lowered to what the day limit leaves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from recharge import policy
from recharge.policy import AccountTerms, PolicyRefusal
from tests.recharge.world import USD

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def terms(age: timedelta = timedelta(0), level: int = 1) -> AccountTerms:
    return AccountTerms(T0 - age, level)


@pytest.mark.parametrize(
    ("amount", "ok"),
    [(9_990_000, False), (10_000_000, True), (10_010_000, True)],
)
def test_minimum_payment_edge(amount: int, ok: bool) -> None:
    if ok:
        policy.check_manual(amount, terms(), 0, T0)
    else:
        with pytest.raises(PolicyRefusal) as e:
            policy.check_manual(amount, terms(), 0, T0)
        assert e.value.code == "amount_below_minimum"


@pytest.mark.parametrize(
    ("age", "paid", "amount", "ok"),
    [
        # day one: $100 in all
        (timedelta(0), 0, 99_990_000, True),
        (timedelta(0), 0, 100_000_000, True),
        (timedelta(0), 0, 100_010_000, False),
        (timedelta(hours=23, minutes=59), 90_000_000, 10_000_000, True),
        (timedelta(hours=23, minutes=59), 90_010_000, 10_000_000, False),
        # day two: $150; the account's own day, not the calendar's
        (timedelta(days=1), 0, 150_000_000, True),
        (timedelta(days=1), 0, 150_010_000, False),
        (timedelta(days=1) - timedelta(seconds=1), 0, 100_010_000, False),
        (timedelta(days=1), 140_000_000, 10_000_000, True),
        (timedelta(days=1), 140_010_000, 10_000_000, False),
        # day three: $200
        (timedelta(days=2), 0, 199_990_000, True),
        (timedelta(days=2), 0, 200_000_000, True),
        (timedelta(days=2), 0, 200_010_000, False),
    ],
)
def test_new_account_limit_edges(age: timedelta, paid: int, amount: int, ok: bool) -> None:
    if ok:
        policy.check_manual(amount, terms(age), paid, T0)
    else:
        with pytest.raises(PolicyRefusal) as e:
            policy.check_manual(amount, terms(age), paid, T0)
        assert e.value.code == "payment_limit_exceeded"
        assert e.value.retry_at == T0 - age + timedelta(days=(age // timedelta(days=1)) + 1)


@pytest.mark.parametrize("amount", [100_010_000, 5_000_000_000])
def test_level_two_verification_lifts_the_limits(amount: int) -> None:
    policy.check_manual(amount, terms(level=2), 10_000_000_000, T0)
    with pytest.raises(PolicyRefusal):
        policy.check_manual(amount, terms(level=1), 0, T0)
    with pytest.raises(PolicyRefusal) as e:  # the minimum still holds
        policy.check_manual(9_990_000, terms(level=2), 0, T0)
    assert e.value.code == "amount_below_minimum"


def test_amount_brings_the_balance_up_to_threshold_plus_recharge() -> None:
    # threshold $20, recharge $50: from $19.99 -> $50.01; from -$30 -> $100
    assert policy.auto_amount(19_990_000, 20 * USD, 50 * USD) == 50_010_000
    assert policy.auto_amount(-30 * USD, 20 * USD, 50 * USD) == 100 * USD
    # rounded up to the cent, never down: credit covers the target
    assert policy.auto_amount(19_999_999, 20 * USD, 50 * USD) == 50_010_000
    # at least the minimum payment
    assert policy.auto_amount(65 * USD, 20 * USD, 10 * USD) == 10 * USD


def _decide(recent: list[datetime], now: datetime = T0, **kw: int) -> policy.AutoDecision:
    return policy.decide_auto(
        balance=kw.get("balance", 5 * USD),
        threshold=kw.get("threshold", 10 * USD),
        recharge=kw.get("recharge", 20 * USD),
        terms=terms(timedelta(days=kw.get("age_days", 30))),
        recent_auto=recent,
        paid_today=kw.get("paid_today", 0),
        now=now,
    )


def test_the_eleventh_recharge_in_24_hours_is_refused_and_the_window_rolls() -> None:
    ten = [T0 - timedelta(hours=23) + timedelta(minutes=10 * i) for i in range(10)]
    assert _decide(ten[:9]).action == "charge"
    d = _decide(ten)
    assert (d.action, d.reason) == ("refuse", "recharge_cap_reached")
    assert d.retry_at == ten[0] + timedelta(hours=24)
    # one second before the oldest leaves the window: still refused; at it: allowed
    assert _decide(ten, now=ten[0] + timedelta(hours=24) - timedelta(seconds=1)).action == "refuse"
    assert _decide(ten, now=ten[0] + timedelta(hours=24)).action == "charge"


def test_an_auto_recharge_is_lowered_to_what_the_day_limit_leaves() -> None:
    d = _decide([], balance=-200 * USD, age_days=0)  # wants $230, day one allows $100
    assert (d.action, d.amount, d.reason) == ("charge", 100 * USD, "lowered_to_day_limit")
    d = _decide([], balance=-200 * USD, age_days=0, paid_today=95 * USD)
    assert (d.action, d.reason) == ("refuse", "payment_limit_exceeded")  # $5 left < $10
    d = _decide([], balance=-200 * USD, age_days=0, paid_today=90 * USD)
    assert (d.action, d.amount) == ("charge", 10 * USD)
