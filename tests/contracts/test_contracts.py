"""The wire contract: money strings, event validation, signals, JSON Schema export."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from contracts.events import CallHangup, MessageSent, parse_inbound
from contracts.money import MoneyFormatError, format_money, parse_money
from contracts.schema import MODELS, export
from contracts.signals import make_signal
from meter.traffic import call_hangup, message_sent


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("12.50", 12_500_000),
        ("0.000450", 450),
        ("0", 0),
        ("-3.1", -3_100_000),
        ("100", 100_000_000),
        ("0.000001", 1),
    ],
)
def test_money_round_trip(text: str, micros: int) -> None:
    assert parse_money(text) == micros
    assert parse_money(format_money(micros)) == micros


@pytest.mark.parametrize("bad", ["1.0000001", "1e3", "", " 1", "1,00", "0x10", "NaN", "1."])
def test_money_rejects(bad: str) -> None:
    with pytest.raises(MoneyFormatError):
        parse_money(bad)


def test_money_refuses_floats() -> None:
    with pytest.raises(MoneyFormatError):
        parse_money(0.1)  # type: ignore[arg-type]


def test_format_money() -> None:
    assert format_money(12_500_000) == "12.50"
    assert format_money(450) == "0.00045"
    assert format_money(-1) == "-0.000001"


def test_inbound_events_parse() -> None:
    ev = parse_inbound(orjson.dumps(call_hangup("acc_1", "c1", "+442071234567", 61)))
    assert isinstance(ev, CallHangup)
    assert ev.data.billable_s == 61 and ev.data.from_ == "+14155550100"
    ev2 = parse_inbound(orjson.dumps(message_sent("acc_1", "m1", "+442071234567", 2)))
    assert isinstance(ev2, MessageSent) and ev2.data.parts == 2


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e["data"].__setitem__("billable_s", "61"),  # strings are not integers
        lambda e: e["data"].__setitem__("billable_s", 61.0),
        lambda e: e.__setitem__("time", "2026-11-22T10:00:00"),  # no offset
        lambda e: e.__setitem__("specversion", "0.3"),
        lambda e: e["data"].__setitem__("direction", "sideways"),
        lambda e: e.__setitem__("type", "call.ringing"),
    ],
)
def test_inbound_events_reject(mutate: object) -> None:
    ev = call_hangup("acc_1", "c1", "+442071234567", 61)
    mutate(ev)  # type: ignore[operator]
    with pytest.raises(ValidationError):
        parse_inbound(orjson.dumps(ev))


def test_subject_must_be_the_account() -> None:
    ev = call_hangup("acc_1", "c1", "+442071234567", 61)
    assert parse_inbound(orjson.dumps(ev)).subject_matches()
    ev["subject"] = "someone_else"
    assert not parse_inbound(orjson.dumps(ev)).subject_matches()


def test_signal_shape() -> None:
    from datetime import UTC, datetime

    s = make_signal("account.hold", "acc_1", 3, "credit_exhausted", datetime.now(UTC))
    body = json.loads(s.model_dump_json())
    assert body["specversion"] == "1.0" and body["type"] == "account.hold"
    assert body["subject"] == "acc_1" and body["id"] == "acc_1:3"
    assert body["data"] == {
        "account_id": "acc_1",
        "reason": "credit_exhausted",
        "seq": 3,
        "call_id": None,
        "terminate_at": None,
        "number": None,
    }


def test_json_schema_export(tmp_path: Path) -> None:
    paths = export(tmp_path)
    assert len(paths) == len(MODELS)
    hangup = json.loads((tmp_path / "call.hangup.schema.json").read_text())
    assert "billable_s" in json.dumps(hangup)
    assert "from" in json.dumps(hangup)  # the wire name, not the Python one
