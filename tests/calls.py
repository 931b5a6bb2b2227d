"""Live calls for the tests: the events of a call's life (answered, progress, hangup to the UK
number of the demo price list), a clock the test moves, and the hot path that meters them
beside an authorizer, as the metering worker and the call-control API run them."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson

from contracts import topics
from enforcement.authorize import Authorizer
from meter.traffic import call_hangup
from metering.processor import MeteringProcessor
from metering.worker import Connections
from rating.catalog import Catalog
from tests import harness
from tests.helpers import Rec

UK = "+442071234567"  # 0.015/min, 6/6 in the demo price list


def answered(
    account: str, call_id: str, at: datetime, direction: str = "outbound"
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{call_id}:answered",
        "source": "urn:switch:t",
        "type": "call.answered",
        "time": at.isoformat(),
        "subject": account,
        "data": {
            "account_id": account,
            "call_id": call_id,
            "direction": direction,
            "from": "+14155550100",
            "to": UK,
            "answered_at": at.isoformat(),
        },
    }


def progress(account: str, call_id: str, at: datetime, elapsed: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{call_id}:progress:{elapsed}",
        "source": "urn:switch:t",
        "type": "call.progress",
        "time": (at + timedelta(seconds=elapsed)).isoformat(),
        "subject": account,
        "data": {"account_id": account, "call_id": call_id, "elapsed_s": elapsed},
    }


def hangup(
    account: str, call_id: str, at: datetime, seconds: int, direction: str = "outbound"
) -> dict[str, Any]:
    return call_hangup(
        account,
        call_id,
        UK,
        seconds,
        at=at + timedelta(seconds=seconds),
        source="urn:switch:t",
        direction=direction,
    )


class Clock:
    def __init__(self, t: datetime) -> None:
        self.now = t.timestamp()

    def __call__(self) -> float:
        return self.now


async def make(conns: Connections, clock: Clock) -> tuple[MeteringProcessor, Authorizer]:
    catalog = Catalog(conns.pool)
    await catalog.refresh()

    p = harness.processor(conns, catalog, clock=clock)
    return p, Authorizer(conns.balances, catalog, grant_s=300, grace_s=60, clock=clock)


_offset = 0


async def feed(p: MeteringProcessor, *events: dict[str, Any]) -> Any:
    global _offset
    recs = []
    for e in events:
        _offset += 1
        recs.append(Rec(topics.CALL_EVENTS, 0, _offset, e["subject"].encode(), orjson.dumps(e)))
    return await p.process(recs)
