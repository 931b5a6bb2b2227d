"""Kafka topic names of the public contract, in one place."""

from typing import Final

CALL_EVENTS: Final = "telephony.call-events"
NUMBER_EVENTS: Final = "telephony.number-events"
MESSAGE_EVENTS: Final = "messaging.message-events"
CONTROL_SIGNALS: Final = "billing.control-signals"
DEAD_LETTER: Final = "billing.dead-letter"
#: Added by this service (issue 5): auto-recharge triggers, from the balance scripts to the
#: recharge worker; and payment notifications for operators and the account's admins.
RECHARGE_REQUESTS: Final = "billing.recharge-requests"
NOTIFICATIONS: Final = "billing.notifications"

#: Topics the metering hot path consumes. Number events are rare, but their fees are debits like
#: any other: charging them in the same batch loop keeps them exactly once and in account order.
METERED: Final = (CALL_EVENTS, MESSAGE_EVENTS, NUMBER_EVENTS)
ALL: Final = (
    CALL_EVENTS,
    NUMBER_EVENTS,
    MESSAGE_EVENTS,
    CONTROL_SIGNALS,
    DEAD_LETTER,
    RECHARGE_REQUESTS,
    NOTIFICATIONS,
)

#: The topic of each inbound event type: where a switch (or ``POST /v1/events`` on its behalf)
#: produces it. Any other topic dead-letters it as ``wrong_topic``.
TOPIC_OF_TYPE: Final[dict[str, str]] = {
    "call.answered": CALL_EVENTS,
    "call.progress": CALL_EVENTS,
    "call.hangup": CALL_EVENTS,
    "message.sent": MESSAGE_EVENTS,
    "number.activated": NUMBER_EVENTS,
    "number.renewal_due": NUMBER_EVENTS,
    "number.deactivated": NUMBER_EVENTS,
}
