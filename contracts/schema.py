"""JSON Schema files of the contract, for telephony teams (``meter contracts export-schema``)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from contracts.events import (
    CallAnswered,
    CallHangup,
    CallProgress,
    MessageSent,
    NumberActivated,
    NumberDeactivated,
    NumberRenewalDue,
)
from contracts.payments import Notification, RechargeRequested
from contracts.signals import Signal

MODELS: dict[str, type[BaseModel]] = {
    "call.answered": CallAnswered,
    "call.progress": CallProgress,
    "call.hangup": CallHangup,
    "message.sent": MessageSent,
    "number.activated": NumberActivated,
    "number.renewal_due": NumberRenewalDue,
    "number.deactivated": NumberDeactivated,
    "control-signal": Signal,
    "recharge.requested": RechargeRequested,
    "notification": Notification,
}


def export(out: Path) -> list[Path]:
    """Write one ``<type>.schema.json`` per event type and signal; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in MODELS.items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"urn:meter:contracts:{name}"
        path = out / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths
