"""Log lines: plain text for people, or one JSON object per line for log shippers.

``METER_LOG_FORMAT=json`` gives ``{"ts", "level", "logger", "msg", ...}`` per record, where
``...`` are the ids of what the line is about: anything passed with ``extra=`` (by convention
``account_id``, ``call_id``, ``event_id``, ``message_id``, ``reservation_id``, ``topic``,
``partition``, ``offset``, ``reason``) and anything bound to the current task with ``bind()``.
A record with an exception carries its traceback as ``exc``. The text format appends the same
ids as ``key=value``, so both formats say the same thing.

    log.warning("hold published", extra={"account_id": a, "call_id": c})
    with bind(account_id=a):     # every line of this task (and tasks it starts) carries it
        ...
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson

#: Attributes every LogRecord has; anything else on a record came in through ``extra=``.
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
_bound: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "meter_log_context", default=None
)


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every record logged by the current task until the block ends.

    Context variables are copied into tasks created inside the block, so a request handler can
    bind ``account_id`` once and every line it causes carries it.
    """
    token = _bound.set({**(_bound.get() or {}), **fields})
    try:
        yield
    finally:
        _bound.reset(token)


def context(record: logging.LogRecord) -> dict[str, Any]:
    """The ids a record is about: bound ones first, ``extra=`` ones override them."""
    out = dict(_bound.get() or {})
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (tracebacks included, escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in context(record).items():
            out.setdefault(key, value)  # an extra named like a core field never replaces it
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: an id that is a UUID, a Path or bytes must not cost the log line.
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """``ts level logger msg key=value ...``: the ids appended to the usual line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ids = context(record)
        if ids:
            line += " " + " ".join(f"{k}={v}" for k, v in ids.items())
        return line


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``METER_LOG_FORMAT`` (``text`` or ``json``)."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r}")
