"""Kafka topic names of the public contract, in one place."""

from typing import Final

CALL_EVENTS: Final = "telephony.call-events"
NUMBER_EVENTS: Final = "telephony.number-events"
MESSAGE_EVENTS: Final = "messaging.message-events"
CONTROL_SIGNALS: Final = "billing.control-signals"
DEAD_LETTER: Final = "billing.dead-letter"

#: Topics the metering hot path consumes.
METERED: Final = (CALL_EVENTS, MESSAGE_EVENTS)
ALL: Final = (CALL_EVENTS, NUMBER_EVENTS, MESSAGE_EVENTS, CONTROL_SIGNALS, DEAD_LETTER)
