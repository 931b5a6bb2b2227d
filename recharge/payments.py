"""The records of payments: a payment, the trigger that asked for it, an account's
auto-recharge settings. Read and written by ``recharge.store`` only; amounts in micro-units."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from recharge.gateway import SavedMethod, idempotency_key

#: ``auto``: an auto-recharge; ``manual``: a top-up (the payments table's CHECK allows these).
PaymentKind = Literal["auto", "manual"]
#: Where a payment is: ``pending`` (to be charged, or its outcome unknown), ``succeeded``
#: (captured), ``declined`` (by the card's bank), ``failed`` (the gateway's error) or
#: ``refused`` (by the policy, never charged); the payments table's CHECK allows these.
PaymentStatus = Literal["pending", "succeeded", "declined", "failed", "refused"]
TriggerStatus = Literal["open", "done", "cancelled"]


@dataclass(frozen=True, slots=True)
class RechargeSettings:
    enabled: bool
    threshold_amount: int
    recharge_amount: int
    disabled_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Payment:
    """A payment, known by ``(account_id, id)``: its id is unique in its account only."""

    id: str
    account_id: str
    kind: PaymentKind
    trigger_seq: int | None
    amount: int  # micro-units asked
    captured: int  # micro-units the gateway took: the only amount ever credited
    currency: str
    status: PaymentStatus
    reason: str
    message: str
    gateway: str
    gateway_ref: str
    method: str
    created_at: datetime
    credited_at: datetime | None
    updated_at: datetime
    gateway_key: str  # the idempotency key it is charged with, on every retry

    @classmethod
    def of(cls, r: asyncpg.Record) -> Payment:
        # kind and status are not checked here: the table's CHECK constraints hold them to
        # the Literals.
        return cls(
            r["id"],
            r["account_id"],
            r["kind"],
            r["trigger_seq"],
            r["amount"],
            r["captured"],
            r["currency"],
            r["status"],
            r["reason"],
            r["message"],
            r["gateway"],
            r["gateway_ref"],
            r["method"],
            r["created_at"],
            r["credited_at"],
            r["updated_at"],
            r["gateway_key"],
        )


@dataclass(frozen=True, slots=True)
class NewPayment:
    """A payment to record before anything is charged, its ``id`` unique in its account;
    ``status`` ``pending`` (to be charged) or ``refused`` (by the policy)."""

    id: str
    account_id: str
    kind: PaymentKind
    amount: int
    gateway: str
    method: str
    created_at: datetime
    trigger_seq: int | None = None
    status: Literal["pending", "refused"] = "pending"
    reason: str = ""
    message: str = ""

    @property
    def gateway_key(self) -> str:
        return idempotency_key(self.account_id, self.id)


@dataclass(frozen=True, slots=True)
class Trigger:
    """A ``recharge.requested`` of the balance scripts, and its attempts so far."""

    account_id: str
    seq: int
    status: TriggerStatus
    attempts: int
    declines: int
    next_attempt_at: datetime


def auto_payment_id(account_id: str, seq: int, attempt: int) -> str:
    """The id of an auto-recharge: attempt ``attempt`` of the account's trigger ``seq``. Unique
    in the account (attempts are counted under its payment lock) and never made anew for a
    retry: a cut-off attempt is found again by its trigger and charged with its own key. It
    starts with the account id, as it always has, so the ids in a history stay what they were.
    At most 64 + 4 + 10 + 1 + 10 characters, under the table's 128."""
    return f"{account_id}:ar:{seq}:{attempt}"


def is_auto_payment_id(account_id: str, payment_id: str) -> bool:
    """``payment_id`` is one ``auto_payment_id`` makes for the account (or could, later)."""
    return payment_id.startswith(f"{account_id}:ar:")


def method_label(m: SavedMethod) -> str:
    """How a payment names the method it was charged to (``visa 4242``)."""
    return f"{m.brand} {m.last4}".strip() or m.method_ref
