"""The seam before the switch: ``SwitchControl``, what the signal bridge asks of it, and
``KamailioRpc`` behind it (Kamailio's ``jsonrpcs`` module over HTTP, served on loopback by
``xhttp``: deploy/kamailio/kamailio.cfg).

Errors::

    SwitchUnavailable   the switch did not answer, or answered something that is not JSON-RPC:
                        nothing is known to have happened; the bridge retries (ending a dialog
                        twice is harmless: the second finds it gone)

A dialog the switch no longer has is not an error: it ended already, which is what was asked.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import httpx

from infra import metrics

log = logging.getLogger(__name__)

#: The dialog profile (with value) that kamailio.cfg puts each call in: the account's id.
ACCOUNT_PROFILE: Final = "account"


class SwitchUnavailable(Exception):
    """The switch's JSON-RPC did not answer or failed; retry."""


@dataclass(frozen=True, slots=True)
class Dialog:
    """A live dialog as the switch lists it: its handle and when it was created (unix s)."""

    h_entry: int
    h_id: int
    call_id: str
    created_at: int
    from_tag: str = ""
    to_tag: str = ""


class SwitchControl(Protocol):
    """What the bridge does on the switch. Each call is idempotent."""

    async def end_call(self, call_id: str) -> int:
        """End the call's dialog(s) with a BYE to both sides; how many were ended (0: gone)."""
        ...

    async def account_calls(self, account_id: str) -> Sequence[Dialog]:
        """The account's live dialogs."""
        ...

    async def end_dialog(self, dialog: Dialog) -> bool:
        """End one dialog; False when it was gone already."""
        ...


class RpcFault(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class KamailioRpc:
    """``SwitchControl`` over Kamailio's JSON-RPC 2.0 at ``url`` (``http://127.0.0.1:PORT/RPC``):
    ``dlg.dlg_list`` and ``dlg.profile_list`` to find dialogs; one is ended by ``POST
    /dialog/end`` beside it (deploy/kamailio/kamailio.cfg: it queues the call's hangup before
    the BYEs, which ``dlg.end_dlg`` in Kamailio 5.6 may lose)."""

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        self._url = url
        self._end_url = str(httpx.URL(url).join("/dialog/end"))
        self._http = httpx.AsyncClient(timeout=timeout_s)
        self._ids = itertools.count(1)

    async def close(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, *params: str | int) -> Any:
        """The method's ``result``; ``RpcFault`` for a JSON-RPC error, ``SwitchUnavailable``
        when the switch does not answer in JSON-RPC."""
        body = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": next(self._ids)}
        try:
            r = await self._http.post(self._url, json=body)
            doc = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            metrics.BRIDGE_RPC_ERRORS.inc()
            raise SwitchUnavailable(f"{method}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(doc, dict):
            metrics.BRIDGE_RPC_ERRORS.inc()
            raise SwitchUnavailable(f"{method}: not a JSON-RPC answer (HTTP {r.status_code})")
        if "error" in doc:
            err = doc["error"] if isinstance(doc["error"], dict) else {}
            raise RpcFault(int(err.get("code", 0)), str(err.get("message", "")))
        return doc.get("result")

    async def _dialogs(self, method: str, *params: str) -> list[Dialog]:
        try:
            result = await self.call(method, *params)
        except RpcFault as exc:
            # A profile or call with nothing in it is an empty answer, or "not found".
            if exc.code in (404, 500):
                return []
            raise SwitchUnavailable(f"{method}: {exc}") from exc
        return [d for d in map(_dialog, _listed(result)) if d is not None]

    async def end_call(self, call_id: str) -> int:
        ended = 0
        for d in await self._dialogs("dlg.dlg_list", call_id):
            ended += await self.end_dialog(d)
        return ended

    async def account_calls(self, account_id: str) -> Sequence[Dialog]:
        return await self._dialogs("dlg.profile_list", ACCOUNT_PROFILE, account_id)

    async def end_dialog(self, dialog: Dialog) -> bool:
        body = {"call_id": dialog.call_id, "from_tag": dialog.from_tag, "to_tag": dialog.to_tag}
        try:
            r = await self._http.post(self._end_url, json=body)
        except httpx.HTTPError as exc:
            metrics.BRIDGE_RPC_ERRORS.inc()
            raise SwitchUnavailable(f"/dialog/end: {type(exc).__name__}: {exc}") from exc
        if r.status_code == 404:
            return False  # ended meanwhile
        if r.status_code != 200:
            metrics.BRIDGE_RPC_ERRORS.inc()
            raise SwitchUnavailable(f"/dialog/end: HTTP {r.status_code}")
        log.info("ended dialog of call %s on the switch", dialog.call_id)
        return True


def _listed(result: Any) -> list[Any]:
    """jsonrpcs answers one dialog as an object, several as an array, none as null/[]."""
    if result is None:
        return []
    if isinstance(result, list):
        return result
    return [result]


def _dialog(raw: Any) -> Dialog | None:
    if not isinstance(raw, dict):
        return None
    caller, callee = raw.get("caller"), raw.get("callee")
    try:
        return Dialog(
            h_entry=int(raw["h_entry"]),
            h_id=int(raw["h_id"]),
            call_id=str(raw.get("call-id", "")),
            created_at=int(raw.get("init_ts") or raw.get("start_ts") or 0),
            from_tag=str(caller.get("tag", "")) if isinstance(caller, dict) else "",
            to_tag=str(callee.get("tag", "")) if isinstance(callee, dict) else "",
        )
    except (KeyError, TypeError, ValueError):
        return None
