"""What a call or a message would cost an account now: the ``meter estimate`` answer.

Read-only: nothing is reserved, debited or drawn. Included seconds are previewed from the
account's minute bucket as it is now (a call answered now would draw them first).
"""

from __future__ import annotations

from dataclasses import dataclass

from balance.protocol import BalanceStore
from contracts.money import format_money
from infra.clock import Clock, system_clock
from rating.catalog import Catalog
from rating.plans import Grant, month_period, parse_bucket, preview_draw
from rating.rating import time_cost, voice_cost


@dataclass(frozen=True, slots=True)
class Estimate:
    account_id: str
    price_list_id: str
    what: str  # "call" | "sms"
    cost: int  # micro-units that would be debited
    billed_s: int = 0
    included_s: int = 0  # of billed_s, taken from included minutes / bundles
    prefix: str = ""
    rate_per_min: int = 0
    connect_fee: int = 0
    increments: str = ""
    parts: int = 0

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "account_id": self.account_id,
            "price_list_id": self.price_list_id,
            "what": self.what,
            "cost": format_money(self.cost),
        }
        if self.what == "sms":
            out["parts"] = self.parts
        else:
            out |= {
                "prefix": self.prefix,
                "rate_per_min": format_money(self.rate_per_min),
                "connect_fee": format_money(self.connect_fee),
                "increments": self.increments,
                "billed_s": self.billed_s,
                "included_s": self.included_s,
            }
        return out


async def estimate(
    catalog: Catalog,
    balances: BalanceStore | None,
    account_id: str,
    *,
    to: str = "",
    seconds: int | None = None,
    direction: str = "outbound",
    sms_parts: int | None = None,
    now: int | None = None,
    clock: Clock = system_clock,
) -> Estimate:
    """Cost of a call of ``seconds`` (answered ``now``, unix s) to ``to``, or of a message of
    ``sms_parts`` parts sent ``now``, with the prices in force then. Raises ``LookupError``
    (``NoRate`` included) for an unknown account or destination. ``balances`` None: no bucket
    preview (money only). ``now`` defaults to ``clock``."""
    now = int(clock()) if now is None else now
    await catalog.resolve((account_id,))
    acct = catalog.get(account_id)
    if acct is None:
        raise LookupError(f"no account {account_id!r}")
    plist = acct.price_list
    if sms_parts is not None:
        cost = plist.rate_message(sms_parts, now)
        return Estimate(account_id, plist.id, "sms", cost, parts=sms_parts)
    if seconds is None or seconds < 0:
        raise ValueError("a call estimate needs --seconds >= 0")
    rate = plist.voice_rate(direction, to, now)
    cost, billed = voice_cost(seconds, rate)
    drawn = 0
    if billed and balances is not None:
        grants = parse_bucket(await balances.bucket(account_id))
        plan = acct.plan
        if plan is not None and plan.included_s:
            start, end = month_period(now)
            if not any(g.id == f"p{start}" for g in grants):  # the period's first call
                grants.append(Grant(f"p{start}", plan.included_s, start, end))
        drawn = preview_draw(grants, billed, now)
        if drawn:
            cost = rate.connect_fee + time_cost(billed - drawn, rate.rate_per_min)
    return Estimate(
        account_id,
        plist.id,
        "call",
        cost,
        billed,
        drawn,
        rate.prefix or direction,
        rate.rate_per_min,
        rate.connect_fee,
        f"{rate.initial_s}/{rate.subsequent_s}",
    )
