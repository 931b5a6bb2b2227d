"""Log formats: one JSON object per line with the ids a line is about; the same ids in text."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from infra.logs import JsonFormatter, TextFormatter, bind, formatter
from infra.settings import Settings, SettingsError
from meter.cli import _setup_logging

Capture = tuple[logging.Logger, io.StringIO, "logging.StreamHandler[io.StringIO]"]


@pytest.fixture
def capture() -> Iterator[Capture]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger(f"meter.test.{id(out)}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out, handler
    finally:
        logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_json_line_has_core_fields_and_the_ids_passed_as_extra(capture: Capture) -> None:
    logger, out, handler = capture
    handler.setFormatter(JsonFormatter())
    logger.warning(
        "hold for %s", "acc_1", extra={"account_id": "acc_1", "call_id": "c-9", "event_id": "e1"}
    )
    [rec] = lines(out)
    assert rec["level"] == "WARNING"
    assert rec["logger"] == logger.name
    assert rec["msg"] == "hold for acc_1"
    assert (rec["account_id"], rec["call_id"], rec["event_id"]) == ("acc_1", "c-9", "e1")
    assert str(rec["ts"]).endswith("+00:00") and "T" in str(rec["ts"])  # RFC 3339, UTC
    assert "exc" not in rec


def test_json_exception_stays_on_one_line_and_odd_values_do_not_break_it(capture: Capture) -> None:
    logger, out, handler = capture
    handler.setFormatter(JsonFormatter())
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("batch failed", extra={"offset": 7, "key": b"acc_1", "level": "x"})
    assert len(out.getvalue().splitlines()) == 1
    [rec] = lines(out)
    assert "ValueError: boom" in str(rec["exc"]) and "Traceback" in str(rec["exc"])
    assert rec["offset"] == 7
    assert rec["key"] == "b'acc_1'"  # not JSON-native: rendered with str(), the line survives
    assert rec["level"] == "ERROR"  # an extra never replaces a core field


async def test_bound_ids_reach_every_line_of_the_task_and_its_children(capture: Capture) -> None:
    logger, out, handler = capture
    handler.setFormatter(JsonFormatter())

    async def child() -> None:
        logger.info("child")

    with bind(account_id="acc_1"):
        logger.info("parent", extra={"call_id": "c1"})
        await asyncio.create_task(child())
        with bind(call_id="c2"):
            logger.info("nested")
    logger.info("after")
    recs = lines(out)
    assert [(r["msg"], r.get("account_id"), r.get("call_id")) for r in recs] == [
        ("parent", "acc_1", "c1"),
        ("child", "acc_1", None),
        ("nested", "acc_1", "c2"),
        ("after", None, None),
    ]


def test_text_format_appends_the_same_ids(capture: Capture) -> None:
    logger, out, handler = capture
    handler.setFormatter(TextFormatter())
    logger.info("plain")
    logger.info("charged", extra={"account_id": "acc_1", "call_id": "c1"})
    first, second = out.getvalue().splitlines()
    assert first.endswith(f"INFO {logger.name} plain")
    assert second.endswith("charged account_id=acc_1 call_id=c1")


def test_log_format_setting_is_checked_and_selects_the_formatter() -> None:
    assert Settings.from_env({"METER_LOG_FORMAT": "json"}).log_format == "json"
    assert Settings.from_env({}).log_format == "text"
    with pytest.raises(SettingsError, match="METER_LOG_FORMAT"):
        Settings.from_env({"METER_LOG_FORMAT": "xml"})
    assert isinstance(formatter("json"), JsonFormatter)
    assert isinstance(formatter("text"), TextFormatter)


def test_cli_logging_setup_installs_the_json_formatter() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []  # basicConfig does nothing while the root logger has handlers
    try:
        _setup_logging("info", "json")
        [handler] = root.handlers
        assert isinstance(handler.formatter, JsonFormatter)
        assert root.level == logging.INFO
    finally:
        for h in root.handlers:
            root.removeHandler(h)
        root.handlers, level = saved
        root.setLevel(level)
