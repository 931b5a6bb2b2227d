"""Which billing group a charge is in, decided when it is rated (docs/design/billing-groups.md).

An outbound call is its outbound profile's group when the profile has one, else its ``from``
number's; an inbound call is its ``to`` number's; a message its ``from`` number's; a number fee
its number's (or the group the number event names, when it is one of the account's). "" is no
group. The ledger keeps what was decided: moving a number later never rewrites history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Groups:
    """An account's assignments: number -> group, outbound profile -> group, and its groups."""

    numbers: Mapping[str, str]
    profiles: Mapping[str, str]
    known: frozenset[str]

    def of_call(self, direction: str, from_: str, to: str, profile_id: str | None) -> str:
        if direction == "outbound":
            if profile_id is not None:
                group = self.profiles.get(profile_id)
                if group:
                    return group
            return self.numbers.get(from_, "")
        return self.numbers.get(to, "")

    def of_message(self, from_: str) -> str:
        return self.numbers.get(from_, "")

    def of_number(self, number: str, stated: str | None) -> str:
        group = self.numbers.get(number)
        if group:
            return group
        return stated if stated is not None and stated in self.known else ""
