"""The payments part of ``meter demo``: auto-recharge seen working, at its cap and on a bad card.

- Every other thin demo account saves a card that pays and turns auto-recharge on (threshold
  $1, recharge $10): the traffic drains them and the recharge worker tops them up.
- ``demo_recharge_cap`` (level-2 verified, so the day-one limit does not stop it first) is
  drained by one $12.50 call each time it is back above its $5 threshold: the worker recharges it
  ten times, refuses the eleventh (the rolling 24-hour cap) and holds the account.
- ``demo_card_declined`` has a card that declines: three declines, backing off, then
  auto-recharge is turned off and the account stays on hold.

The recharge worker is the real one (``meter run recharge``, faust), in a process of its own,
with the sandbox gateway (Stripe's test cards, no network).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from balance.accounts import AccountSpec, create_accounts
from contracts import topics
from infra.kafkatools import read_all
from infra.settings import Settings
from meter.traffic import call_hangup
from metering.worker import Connections
from recharge.policy import MAX_AUTO_RECHARGES
from recharge.sandbox import SandboxGateway
from recharge.service import LogNotifier, PaymentService

CAP = "demo_recharge_cap"
DECLINED = "demo_card_declined"
USD = 1_000_000
#: $12.50: 50,000 s at the demo price list's $0.015/min to +44.
HEAVY_CALL_S = 50_000
UK = "+442071234567"


@dataclass
class RechargeDemo:
    settings: Settings
    conns: Connections
    auto_accounts: list[str]
    worker: subprocess.Popen[bytes] | None = None
    heavy_calls: int = 0
    log: Path = Path("recharge.log")
    notes: Counter[str] = field(default_factory=Counter)

    async def setup(self, specs: list[AccountSpec]) -> None:
        svc = PaymentService(self.conns.pool, self.conns.balances, SandboxGateway(), LogNotifier())
        special = [
            AccountSpec.model_validate(
                {"id": CAP, "price_list_id": "standard", "balance": "15.00"}
            ),
            AccountSpec.model_validate(
                {"id": DECLINED, "price_list_id": "standard", "balance": "8.00"}
            ),
        ]
        await create_accounts(self.conns.pool, self.conns.balances, special)
        await self.conns.pool.execute(
            "UPDATE accounts SET verification_level = 2 WHERE id = $1", CAP
        )
        for a in self.auto_accounts:
            await svc.save_method(a, "pm_card_visa")
            await svc.set_auto_recharge(a, True, 1 * USD, 10 * USD)
        await svc.save_method(CAP, "pm_card_visa")
        await svc.set_auto_recharge(CAP, True, 5 * USD, 10 * USD)
        await svc.save_method(DECLINED, "pm_card_chargeDeclined")
        await svc.set_auto_recharge(DECLINED, True, 5 * USD, 10 * USD)

    def start_worker(self) -> None:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
        env.update(
            {
                "METER_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
                "METER_REDIS_URL": s.redis_url,
                "METER_DATABASE_URL": s.database_url,
                "METER_KAFKA_SESSION_TIMEOUT_MS": str(s.kafka_session_timeout_ms),
                "METER_PAYMENT_GATEWAY": "sandbox",
                # A demo cannot wait the production back-off (minutes) between declines.
                "METER_RECHARGE_BACKOFF_S": "1,2",
                "METER_RECHARGE_SCAN_INTERVAL_S": "0.5",
                "METER_LOG_LEVEL": "INFO",
            }
        )
        with self.log.open("ab") as out:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "meter.cli", "run", "recharge"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop_worker(self) -> None:
        w = self.worker
        if w is not None and w.poll() is None:
            w.terminate()
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()

    async def drive(self, stop: asyncio.Event) -> None:
        """One heavy call on the cap account each time it is back above its threshold (so
        each call is a crossing of its own), and one on the declining card's account."""
        await self._heavy_call(DECLINED)
        calls = 0
        charged = True  # the last call's debit has been applied
        while not stop.is_set() and calls <= MAX_AUTO_RECHARGES:
            st = await self.conns.balances.get(CAP)
            if st is not None:
                if not charged:
                    charged = st.available <= 5 * USD  # the call crossed the threshold
                elif st.status != "hold" and st.available > 5 * USD:  # recharged
                    await self._heavy_call(CAP)
                    calls += 1
                    charged = False
            await asyncio.sleep(0.05)

    async def _heavy_call(self, account: str) -> None:
        self.heavy_calls += 1
        ev = call_hangup(account, f"{account}-heavy-{self.heavy_calls}", UK, HEAVY_CALL_S)
        fut = await self.conns.producer.send(topics.CALL_EVENTS, orjson.dumps(ev), account.encode())
        await fut

    async def settle(self, within: float = 30.0) -> None:
        """Wait until the worker has nothing left in flight: both special accounts done."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            cap = await self.conns.pool.fetchval(
                "SELECT count(*) FROM payments WHERE account_id = $1 AND status = 'refused'", CAP
            )
            off = await self.conns.pool.fetchval(
                "SELECT disabled_reason FROM auto_recharge WHERE account_id = $1", DECLINED
            )
            pending = await self.conns.pool.fetchval(
                "SELECT count(*) FROM payments WHERE status = 'pending'"
                " OR (status = 'succeeded' AND credited_at IS NULL)"
            )
            if cap and off and not pending:
                return
            await asyncio.sleep(0.3)

    async def report(self, say: object) -> bool:
        assert callable(say)
        pool = self.conns.pool
        by = await pool.fetch(
            "SELECT kind, status, count(*) AS n, sum(captured)::bigint AS captured FROM payments"
            " GROUP BY kind, status ORDER BY kind, status"
        )
        captured = sum(r["captured"] or 0 for r in by)
        credits = await pool.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(amount), 0)::bigint AS total FROM ledger"
            " WHERE kind = 'credit' AND source = 'urn:meter:payments'"
        )
        succeeded = sum(r["n"] for r in by if r["status"] == "succeeded")
        busiest = await pool.fetchval(
            "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM payments WHERE"
            " kind = 'auto' AND status = 'succeeded' AND created_at > now() - interval '24 hours'"
            " GROUP BY account_id) t"
        )
        cap_ok = await pool.fetchval(
            "SELECT count(*) FROM payments WHERE account_id = $1 AND kind = 'auto'"
            " AND status = 'succeeded'",
            CAP,
        )
        cap_refused = await pool.fetchval(
            "SELECT count(*) FROM payments WHERE account_id = $1 AND status = 'refused'"
            " AND reason = 'recharge_cap_reached'",
            CAP,
        )
        cap_state = await self.conns.balances.get(CAP)
        declines = await pool.fetchval(
            "SELECT count(*) FROM payments WHERE account_id = $1 AND status = 'declined'",
            DECLINED,
        )
        off = await pool.fetchval(
            "SELECT disabled_reason FROM auto_recharge WHERE account_id = $1", DECLINED
        )
        recharged = await pool.fetchval(
            "SELECT count(DISTINCT account_id) FROM payments WHERE kind = 'auto'"
            " AND status = 'succeeded' AND account_id <> ALL($1::text[])",
            [CAP, DECLINED],
        )
        for m in await read_all(self.settings.kafka_bootstrap, topics.NOTIFICATIONS):
            self.notes[orjson.loads(m.value)["type"]] += 1

        say("")
        say("payments")
        for r in by:
            say(
                f"  {r['kind']:<6} {r['status']:<9} {r['n']:>4}  captured "
                f"{(r['captured'] or 0) / 1e6:,.2f} USD"
            )
        assert credits is not None
        n_credits, credited = credits["n"], credits["total"]
        ok_credit = n_credits == succeeded and credited == captured
        say(
            f"  ledger credits                {n_credits} rows, {credited / 1e6:,.2f} USD"
            f"  {'== captured' if ok_credit else '!= captured  <-- MISMATCH'}"
        )
        say(f"  demo accounts auto-recharged  {recharged} of {len(self.auto_accounts)} enrolled")
        ok_cap = (
            cap_ok == MAX_AUTO_RECHARGES
            and cap_refused >= 1
            and cap_state is not None
            and cap_state.status == "hold"
        )
        say(
            f"  {CAP:<29} {cap_ok} recharges, {cap_refused} refused by the 24 h cap, "
            f"status {cap_state.status if cap_state else '?'}  {'ok' if ok_cap else '<-- WRONG'}"
        )
        ok_declined = declines == 3 and off == "repeated_declines"
        say(
            f"  {DECLINED:<29} {declines} declines, auto-recharge off ({off})"
            f"  {'ok' if ok_declined else '<-- WRONG'}"
        )
        say(f"  most auto-recharges of one account in 24 h: {busiest} (cap {MAX_AUTO_RECHARGES})")
        say(f"  notifications published       {dict(sorted(self.notes.items()))}")
        return ok_credit and ok_cap and ok_declined and busiest <= MAX_AUTO_RECHARGES
