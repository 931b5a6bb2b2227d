"""What the bodies of every room's routes share (pydantic v2; they are the OpenAPI schemas).

Requests are strict (``RequestBody``): a count must be a JSON integer, a string a JSON string,
and unknown fields are refused (422), because a misspelt optional field would otherwise be
dropped unnoticed and the caller is there to read the error. Money leaves as decimal strings
(``Money``), timestamps as RFC 3339 with an offset (``Z`` for UTC).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

#: Money in an answer: ``contracts.money.format_money`` of micro-units, e.g. ``"12.50"``.
Money = Annotated[str, Field(pattern=r"^-?\d{1,15}\.\d{2,6}$", examples=["12.50"])]


class RequestBody(BaseModel):
    """The base of every request body: strict, unknown fields refused, frozen."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
