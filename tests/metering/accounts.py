"""Accounts for the metering tests of included minutes, made as an operator makes them."""

from __future__ import annotations

from balance.accounts import AccountSpec, PlanSpec, create_accounts, put_plan, put_price_list
from meter.traffic import demo_price_list
from metering.worker import Connections


async def account(
    conns: Connections, account_id: str, *, minutes: int = 0, balance: str = "0"
) -> None:
    """An account on the demo price list with ``minutes`` included per month (0: no plan)."""
    await put_price_list(conns.pool, demo_price_list())
    plan = None
    if minutes:
        plan = f"flat{minutes}"
        await put_plan(conns.pool, PlanSpec(id=plan, included_minutes=minutes))
    await create_accounts(
        conns.pool,
        conns.balances,
        [
            AccountSpec.model_validate(
                {"id": account_id, "price_list_id": "standard", "plan_id": plan, "balance": balance}
            )
        ],
    )
