"""``meter demo --sip``: the service behind a real switch, for a newcomer to watch.

Kamailio (deploy/kamailio/kamailio.cfg) proxies SIPp callers to a SIPp callee; the API
authorizes every call and takes the switch's events over HTTP, the metering worker charges
them, the signal bridge enforces signals on Kamailio; embedded broker, Redis and PostgreSQL.
Eleven calls: two on an account with no credit (402); two at once on one whose credit lasts
12 s (the first holds it all and is cut at 12 s, the second is refused); six that hang up on
their own; and one on an account an operator suspends mid-call. Then one line per call and a
reconciliation: exit 0 when every answered call is charged once and the books agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path

import httpx

from balance.accounts import AccountSpec, create_accounts, put_price_list
from bridge.worker import run_bridge
from infra.http.api_keys import ApiKeys
from infra.settings import Settings
from infra.stack import running_stack
from meter import sip
from meter.apiserver import asgi_app, server_for
from meter.traffic import demo_price_list
from metering.worker import Connections, connect, run_metering
from ops.reconcile import reconcile

UK = "+442071234567"  # 0.015/min, 6/6 in the demo price list


def _say(line: str) -> None:
    print(line, flush=True)


async def run_sip_demo(settings: Settings, keep: bool) -> int:
    missing = sip.missing()
    if missing:
        _say(f"meter demo --sip needs Kamailio and SIPp; missing: {', '.join(missing)}")
        _say(f"  apt-get install {' '.join(sip.PACKAGES)}   (./run demo --sip does it)")
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per JSON-RPC call otherwise
    root = (Path(settings.data_dir) / f"demo-sip-{int(time.time())}").resolve()
    settings = dataclasses.replace(settings, kafka_session_timeout_ms=3_000)
    _say("meter demo --sip: Kamailio and SIPp in front of the service")
    _say(f"  embedded services and logs under {root}")
    try:
        async with running_stack(settings, root / "stack") as s, connect(s) as conns:
            return await _demo(s, conns, root)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


async def _demo(s: Settings, conns: Connections, root: Path) -> int:
    await put_price_list(conns.pool, demo_price_list())
    accounts = {"rich": "100.00", "broke": "0", "thin": "0.004", "naughty": "100.00"}
    await create_accounts(
        conns.pool,
        conns.balances,
        [
            AccountSpec.model_validate({"id": a, "price_list_id": "standard", "balance": b})
            for a, b in {**accounts, "platform": "0"}.items()
        ],
    )
    keys = ApiKeys(conns.pool)
    _, service_key = await keys.create("platform", "service")
    _, operator = await keys.create(None, "operator")
    _say("  accounts: rich $100, broke $0, thin $0.004 (12 s to the UK), naughty $100")
    port = sip.free_port()
    server = server_for(asgi_app(s), "127.0.0.1", port)
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                return 1
            await asyncio.sleep(0.05)
        stack.push_async_callback(_shut, server, serving)
        worker = asyncio.create_task(run_metering(s, stop, conns=conns))
        callee = await stack.enter_async_context(sip.running_callee(root / "callee"))
        switch = await stack.enter_async_context(
            sip.running_kamailio(
                root / "kamailio",
                api_url=f"http://127.0.0.1:{port}",
                service_key=service_key,
                next_hop_port=callee,
            )
        )
        bridge = asyncio.create_task(
            run_bridge(dataclasses.replace(s, bridge_rpc_url=switch.rpc_url), stop)
        )
        _say(f"  API on :{port}, Kamailio on udp :{switch.sip_port}, bridge on {switch.rpc_url}")

        def group(name: str, who: list[str], hold_ms: int) -> asyncio.Task[list[sip.Call]]:
            return asyncio.create_task(
                sip.place_calls(
                    root / "calls", name, switch=switch, accounts=who, hold_ms=hold_ms, to=UK
                )
            )

        started = time.time()
        groups = {
            "broke": group("broke", ["broke"] * 2, 5_000),
            "thin": group("thin", ["thin"] * 2, 30_000),
            "rich": group("rich", ["rich"] * 6, 7_000),
            "naughty": group("naughty", ["naughty"], 30_000),
        }
        _say("  11 calls placed; in 4 s an operator suspends 'naughty'")
        await asyncio.sleep(4)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            r = await http.post(
                "/v1/accounts/naughty/suspend",
                headers={"Authorization": f"Bearer {operator}"},
                json={},
            )
        _say(f"  POST /v1/accounts/naughty/suspend -> {r.status_code}")
        results = {name: await t for name, t in groups.items()}
        answered = [c for calls in results.values() for c in calls if c.answered]
        for _ in range(100):  # the hangups on their way to the ledger
            n = await conns.pool.fetchval(
                "SELECT count(DISTINCT ref) FROM ledger WHERE kind = 'call'"
            )
            if n == len(answered):
                break
            await asyncio.sleep(0.1)
        rows = {
            r["ref"]: r
            for r in await conns.pool.fetch(
                "SELECT ref, amount, quantity FROM ledger WHERE kind = 'call'"
            )
        }
        _say(f"  {'account':<8} {'call':<22} {'outcome':<26} {'talked':>7} {'billed':>7} charged")
        for name, calls in results.items():
            for c in calls:
                if c.denied:
                    outcome, talked = f"402 {c.denied}", ""
                elif c.refused:
                    outcome, talked = f"refused {c.refused}", ""
                elif c.answered and c.ended:
                    by = "ended by the switch" if c.network_bye else "caller hung up"
                    outcome, talked = by, f"{c.ended - c.answered:.1f}s"
                else:
                    outcome, talked = "?", ""
                row = rows.get(c.call_id)
                billed = f"{row['quantity']}s" if row else ""
                money = f"${-row['amount'] / 1e6:.6f}" if row else ""
                _say(f"  {name:<8} {c.call_id:<22} {outcome:<26} {talked:>7} {billed:>7} {money}")
        rec = await reconcile(conns.pool, conns.balances)
        once = len(rows) == len(answered)
        _say(
            f"  {len(answered)} answered calls, {len(rows)} charged (once each: {once}); "
            f"drift {rec.drift_micros} micro-units; {time.time() - started:.0f} s"
        )
        stop.set()
        await asyncio.wait_for(asyncio.gather(worker, bridge), 30)
        ok = once and rec.ok
        _say("OK" if ok else "NOT OK")
        return 0 if ok else 1
    return 1


async def _shut(server: object, serving: asyncio.Task[None]) -> None:
    server.should_exit = True  # type: ignore[attr-defined]
    await asyncio.wait_for(serving, 20)
