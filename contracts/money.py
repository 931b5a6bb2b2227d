"""Money on the wire is a decimal string; inside the service an integer of micro-units.

``"12.50"`` <-> ``12_500_000``. Floats are refused everywhere: ``0.1 + 0.2`` is not money.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

MICROS_PER_UNIT: Final = 1_000_000
# Sign, integer part, optional fraction of at most 6 digits. No exponent, no spaces.
_MONEY_RE: Final = re.compile(r"^(-?)(\d{1,15})(?:\.(\d{1,6}))?$")


class MoneyFormatError(ValueError):
    """The text is not a decimal amount with at most 6 decimal places."""


def parse_money(text: str) -> int:
    """Parse ``"12.50"`` into micro-units (``12_500_000``). Exact; refuses > 6 decimals."""
    if not isinstance(text, str):
        raise MoneyFormatError('money must be a decimal string such as "12.50", not a number')
    m = _MONEY_RE.match(text)
    if m is None:
        raise MoneyFormatError(
            f"invalid amount {text[:40]!r}: expected a decimal string with at most 6 decimal places"
        )
    sign, whole, frac = m.groups()
    micros = int(whole) * MICROS_PER_UNIT + int((frac or "").ljust(6, "0"))
    return -micros if sign else micros


def format_money(micros: int) -> str:
    """Format micro-units as a decimal string with 2 to 6 decimals: ``"12.50"``, ``"0.000450"``."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"


def _validate(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, str):
        raise MoneyFormatError('money must be a decimal string such as "12.50"')
    return parse_money(value)


#: A pydantic field type: a decimal string on the wire, an ``int`` of micro-units in Python.
Micros = Annotated[
    int,
    BeforeValidator(_validate),
    PlainSerializer(format_money, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": r"^-?\d{1,15}(\.\d{1,6})?$", "examples": ["12.50"]}
    ),
]
