"""Cursor pagination, as every list of the API answers (the contract): ``?limit=`` (1 to 200,
default 50) and ``?cursor=`` (opaque: the ``next_cursor`` of the page before), answering
``{"data": [...], "next_cursor": ... | null}``; null means the list is done.

A cursor is a keyset position, the ``(created_at, id)`` of the last item given, so a page is
an index range scan however deep it is, and items created while a client walks the list never
shift the pages it has yet to read. It names its list too: a cursor of one list given to
another is refused (422 ``validation_error``, field ``cursor``) rather than silently misread.
It carries no secret and grants nothing: every page is still scoped by the caller's account.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Final, TypeVar

import orjson
from fastapi import Query

from infra.http.errors import ApiError

_T = TypeVar("_T")

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 200
#: Longer than any cursor this module makes (a list name, a timestamp, an id of ~30 chars).
MAX_CURSOR: Final = 256

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"Items per page, 1 to {MAX_LIMIT}")]
Cursor = Annotated[
    str | None,
    Query(max_length=MAX_CURSOR, description="The `next_cursor` of the previous page"),
]

#: The last item of a page: its ``(created_at, id)``.
Position = tuple[datetime, str]


def encode(kind: str, at: Position) -> str:
    raw = orjson.dumps([kind, at[0].isoformat(), at[1]])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(kind: str, cursor: str | None) -> Position | None:
    """Where the page after ``cursor`` starts (None: at the start); 422 for anything that is
    not a cursor of list ``kind``."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got, at, ident = orjson.loads(raw)
        when = datetime.fromisoformat(at)
        if got == kind and isinstance(ident, str) and when.tzinfo is not None:
            return when, ident
    except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError):
        pass
    raise ApiError(422, "validation_error", "cursor: not a cursor of this list", "cursor")


def page(
    kind: str, rows: Sequence[_T], limit: int, position: Callable[[_T], Position]
) -> tuple[list[_T], str | None]:
    """The page of ``rows`` (fetched with ``limit + 1``: one more tells that there is more)
    and its ``next_cursor``."""
    shown = list(rows[:limit])
    if len(rows) <= limit or not shown:
        return shown, None
    return shown, encode(kind, position(shown[-1]))
