"""The one clock: whatever decides by calendar takes ``now`` from here, injected.

A ``Clock`` is any ``Callable[[], float]`` giving unix seconds (UTC). Production passes
``system_clock``; tests pass a ``SettableClock`` set to whatever date they test (the last
second of a month, 29 February, 31 December) and advance it instead of sleeping. Components
take a ``clock`` argument defaulting to ``system_clock``, or a ``now`` argument defaulting to
``system_clock()``; nothing else in the code reads the wall clock to decide by calendar.

Redis and PostgreSQL have clocks of their own: Lua scripts never read theirs (``TIME``) nor
set absolute expiry (``EXPIREAT``). They are given ``now`` and set expiry relative to it
(``EXPIRE target - now``), so a script behaves the same whatever the server's clock says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

#: Unix seconds, UTC, as ``time.time`` gives them.
Clock = Callable[[], float]


def system_clock() -> float:
    """The machine's wall clock (unix seconds)."""
    return time.time()


def utc_datetime(clock: Clock = system_clock) -> datetime:
    """``clock``'s time as an aware UTC ``datetime``."""
    return datetime.fromtimestamp(clock(), UTC)


def datetime_clock(clock: Clock = system_clock) -> Callable[[], datetime]:
    """``clock`` as a callable giving aware UTC ``datetime``s (for code that reasons in them)."""
    return lambda: utc_datetime(clock)


class SettableClock:
    """A clock for tests: it stands still at the time it is set to, until set or advanced.

    ``SettableClock(datetime(2028, 2, 29, 12, tzinfo=UTC))`` or ``SettableClock(1_830_297_600)``.
    """

    def __init__(self, at: float | datetime) -> None:
        self.now = at.timestamp() if isinstance(at, datetime) else float(at)

    def __call__(self) -> float:
        return self.now

    def set(self, at: float | datetime) -> None:
        self.now = at.timestamp() if isinstance(at, datetime) else float(at)

    def advance(self, seconds: float) -> float:
        """Move forward ``seconds`` (backward if negative); returns the new time."""
        self.now += seconds
        return self.now
