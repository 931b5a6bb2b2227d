"""A local stand-in for the part of Stripe's v1 API the adapter uses, for tests.

It runs an ``http.server`` in a background thread, so the test's event loop can await the real
stripe client against it. It reads form-encoded bodies exactly as stripe-python sends them
(``metadata[account_id]=...``, ``off_session=true``), answers in Stripe's JSON shapes, checks
the bearer key, and implements Stripe's idempotency rules (same key + same request: the stored
response replayed with ``Idempotent-Replayed: true``; same key + other parameters: 400
``idempotency_error``).

Its test cards are its own table, not the sandbox's, so the two gateways are checked against
independent models of Stripe.

Fault knobs: ``fail_next`` (5xx/429 answered in front of the API, nothing stored, unless
``stored=True`` which mimics Stripe replaying a 500 from inside the endpoint); ``delay_next``
(process and store, then hold the response past the client's timeout); ``force_status`` (the
next PaymentIntent ends in the given status with HTTP 200).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import secrets
import string
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_KEY = "sk_test_fake_51Hx"

Json = dict[str, Any]


@dataclass(frozen=True)
class _Card:
    brand: str
    last4: str
    decline_code: str  # "" = the charge succeeds
    message: str


# docs.stripe.com/testing: the test PaymentMethods and what charging them does.
TEST_METHODS: dict[str, _Card] = {
    "pm_card_visa": _Card("visa", "4242", "", ""),
    "pm_card_mastercard": _Card("mastercard", "4444", "", ""),
    "pm_card_chargeDeclined": _Card("visa", "0002", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": _Card(
        "visa", "9995", "insufficient_funds", "Your card has insufficient funds."
    ),
    "pm_card_authenticationRequired": _Card(
        "visa",
        "3184",
        "authentication_required",
        "Your card was declined. This transaction requires authentication.",
    ),
}

_ALNUM = string.ascii_letters + string.digits
_MIN_CENTS = 50  # Stripe's minimum charge, USD


def _id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(n))


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    params: dict[str, str]  # flat form keys as sent: "metadata[account_id]"
    status: int
    replayed: bool


@dataclass
class _Fault:
    pattern: str
    remaining: int
    status: int = 500
    delay_s: float = 0.0  # > 0: process, store, then hold the response
    stored: bool = False


@dataclass(frozen=True)
class _Stored:
    method: str
    path: str
    params: dict[str, str]
    status: int
    body: Json
    request_id: str


class _Error(Exception):
    def __init__(self, status: int, error: Json) -> None:
        super().__init__(error.get("message"))
        self.status = status
        self.error = error


def _invalid(message: str, *, code: str | None = None, param: str | None = None) -> _Error:
    error: Json = {"type": "invalid_request_error", "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return _Error(400, error)


def _metadata(params: dict[str, str]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        m = re.fullmatch(r"metadata\[(.+)\]", k)
        if m:
            out[m.group(1)] = v
    return out


@dataclass
class _State:
    customers: dict[str, Json] = field(default_factory=dict)
    methods: dict[str, Json] = field(default_factory=dict)
    detached: set[str] = field(default_factory=set)
    idempotency: dict[str, _Stored] = field(default_factory=dict)


class StripeFake:
    """Start with ``with StripeFake() as fake:`` (or ``start()``/``stop()``); point the client
    at ``fake.url``."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._release = threading.Event()  # cuts held (delayed) responses short on stop
        self._state = _State()
        self._faults: list[_Fault] = []
        self._forced_status: list[str] = []
        self._requests: list[RecordedRequest] = []
        self._intents: list[Json] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> StripeFake:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- knobs ----------------------------------------------------------------------------------

    def fail_next(
        self, path: str, times: int = 1, *, status: int = 500, stored: bool = False
    ) -> None:
        """Answer the next ``times`` requests whose path matches ``path`` (fnmatch) with
        ``status`` (5xx: api_error, 429: rate_limit), without executing them. ``stored=True``
        saves the error under the request's idempotency key, as Stripe does for a 500 raised
        once the endpoint has begun, so retries with that key replay it."""
        with self._lock:
            self._faults.append(_Fault(path, times, status=status, stored=stored))

    def delay_next(self, path: str, seconds: float, times: int = 1) -> None:
        """Execute and store the next ``times`` matching requests, then hold each response for
        ``seconds``: the client times out although the work was done."""
        with self._lock:
            self._faults.append(_Fault(path, times, delay_s=seconds))

    def force_status(self, status: str) -> None:
        """The next PaymentIntent created ends in ``status`` and is answered with HTTP 200."""
        with self._lock:
            self._forced_status.append(status)

    # -- records --------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and fnmatch.fnmatch(r.path, path)]

    @property
    def payment_intents(self) -> list[Json]:
        """Every PaymentIntent created, declined ones included; replays create none."""
        with self._lock:
            return [dict(pi) for pi in self._intents]

    @property
    def charges(self) -> list[Json]:
        """PaymentIntents that captured money."""
        return [pi for pi in self.payment_intents if pi["status"] == "succeeded"]

    def customer(self, customer_id: str) -> Json:
        with self._lock:
            return copy.deepcopy(self._state.customers[customer_id])

    # -- request handling (handler threads) -------------------------------------------------

    def _take_fault(self, path: str) -> _Fault | None:
        for f in self._faults:
            if f.remaining > 0 and fnmatch.fnmatch(path, f.pattern):
                f.remaining -= 1
                return f
        return None

    def handle(
        self, method: str, path: str, headers: dict[str, str], params: dict[str, str]
    ) -> tuple[int, Json, dict[str, str], float]:
        """Returns status, body, extra headers and how long to hold the response."""
        with self._lock:
            status, body, extra, delay, replayed = self._handle_locked(
                method, path, headers, params
            )
            self._requests.append(RecordedRequest(method, path, headers, params, status, replayed))
        return status, body, extra, delay

    def _handle_locked(
        self, method: str, path: str, headers: dict[str, str], params: dict[str, str]
    ) -> tuple[int, Json, dict[str, str], float, bool]:
        request_id = _id("req_", 14)
        extra = {"Request-Id": request_id}
        auth = headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            shown = auth.removeprefix("Bearer ")[:8]
            return (
                401,
                {
                    "error": {
                        "type": "invalid_request_error",
                        "message": f"Invalid API Key provided: {shown}****",
                    }
                },
                extra,
                0.0,
                False,
            )

        fault = self._take_fault(path)
        key = headers.get("idempotency-key") if method == "POST" else None

        if key is not None and key in self._state.idempotency:
            stored = self._state.idempotency[key]
            if (stored.method, stored.path, stored.params) != (method, path, params):
                return (
                    400,
                    {
                        "error": {
                            "type": "idempotency_error",
                            "message": (
                                "Keys for idempotent requests can only be used with the same "
                                "parameters they were first used with. Try using a key other "
                                f"than '{key}' if you meant to execute a different request."
                            ),
                        }
                    },
                    extra,
                    0.0,
                    False,
                )
            extra["Idempotent-Replayed"] = "true"
            extra["Original-Request"] = stored.request_id
            return stored.status, stored.body, extra, 0.0, True

        if fault is not None and fault.delay_s == 0:
            if fault.status == 429:
                error: Json = {
                    "type": "invalid_request_error",
                    "code": "rate_limit",
                    "message": "Too many requests hit the API too quickly.",
                }
            else:
                error = {"type": "api_error", "message": "An unknown error occurred"}
            body: Json = {"error": error}
            if fault.stored and key is not None:
                self._state.idempotency[key] = _Stored(
                    method, path, params, fault.status, body, request_id
                )
            return fault.status, body, extra, 0.0, False

        try:
            status, body = 200, self._route(method, path, params)
        except _Error as e:
            status, body = e.status, {"error": e.error}
        if key is not None:
            self._state.idempotency[key] = _Stored(method, path, params, status, body, request_id)
        delay = fault.delay_s if fault is not None else 0.0
        return status, body, extra, delay, False

    def _route(self, method: str, path: str, params: dict[str, str]) -> Json:
        parts = path.strip("/").split("/")
        match method, parts:
            case "POST", ["v1", "customers"]:
                return self._create_customer(params)
            case "POST", ["v1", "customers", cid]:
                return self._update_customer(cid, params)
            case "GET", ["v1", "payment_methods", pm]:
                return self._get_method(pm)
            case "POST", ["v1", "payment_methods", pm, "attach"]:
                return self._attach(pm, params)
            case "POST", ["v1", "payment_methods", pm, "detach"]:
                return self._detach(pm)
            case "POST", ["v1", "payment_intents"]:
                return self._create_intent(params)
        raise _Error(
            404,
            {
                "type": "invalid_request_error",
                "message": f"Unrecognized request URL ({method}: {path}).",
            },
        )

    def _create_customer(self, params: dict[str, str]) -> Json:
        cus: Json = {
            "id": _id("cus_", 14),
            "object": "customer",
            "livemode": False,
            "metadata": _metadata(params),
            "invoice_settings": {"default_payment_method": None},
        }
        self._state.customers[cus["id"]] = cus
        return cus

    def _customer_or_error(self, cid: str, param: str = "customer") -> Json:
        cus = self._state.customers.get(cid)
        if cus is None:
            raise _invalid(f"No such customer: '{cid}'", code="resource_missing", param=param)
        return cus

    def _update_customer(self, cid: str, params: dict[str, str]) -> Json:
        cus = self._customer_or_error(cid, param="id")
        default = params.get("invoice_settings[default_payment_method]")
        if default is not None:
            pm = self._state.methods.get(default)
            if pm is None or pm["customer"] != cid:
                raise _invalid(
                    f"No such PaymentMethod: '{default}'",
                    code="resource_missing",
                    param="invoice_settings[default_payment_method]",
                )
            cus["invoice_settings"]["default_payment_method"] = default
        cus["metadata"].update(_metadata(params))
        return cus

    def _method_object(self, pm_id: str, card: _Card, customer: str | None) -> Json:
        return {
            "id": pm_id,
            "object": "payment_method",
            "type": "card",
            "livemode": False,
            "customer": customer,
            "card": {
                "brand": card.brand,
                "last4": card.last4,
                "exp_month": 12,
                "exp_year": 2034,
                "funding": "credit",
                "country": "US",
            },
            "metadata": {},
        }

    def _get_method(self, pm: str) -> Json:
        if pm in self._state.methods:
            return self._state.methods[pm]
        if pm in TEST_METHODS:
            return self._method_object(pm, TEST_METHODS[pm], None)
        raise _invalid(f"No such PaymentMethod: '{pm}'", code="resource_missing", param="id")

    def _attach(self, pm: str, params: dict[str, str]) -> Json:
        cid = params.get("customer", "")
        self._customer_or_error(cid)
        if pm in TEST_METHODS:
            # Stripe attaches a fresh copy of a test method, with its own id.
            obj = self._method_object(_id("pm_"), TEST_METHODS[pm], cid)
            obj["_card"] = pm
            self._state.methods[obj["id"]] = obj
            return _public(obj)
        existing = self._state.methods.get(pm)
        if existing is None:
            raise _invalid(
                f"No such PaymentMethod: '{pm}'", code="resource_missing", param="payment_method"
            )
        if pm in self._state.detached:
            raise _invalid(
                "This PaymentMethod was previously used without being attached to a Customer "
                "or was detached from a Customer, and may not be used again.",
                code="payment_method_unexpected_state",
            )
        if existing["customer"] not in (None, cid):
            raise _invalid(
                "The payment method you provided has already been attached to a customer.",
                code="payment_method_unexpected_state",
            )
        existing["customer"] = cid
        return _public(existing)

    def _detach(self, pm: str) -> Json:
        existing = self._state.methods.get(pm)
        if existing is None:
            raise _invalid(f"No such PaymentMethod: '{pm}'", code="resource_missing", param="id")
        if existing["customer"] is None:
            raise _invalid(
                "The payment method you provided is not attached to a customer so detachment "
                "is impossible.",
                code="payment_method_unexpected_state",
            )
        existing["customer"] = None
        self._state.detached.add(pm)
        for cus in self._state.customers.values():
            if cus["invoice_settings"]["default_payment_method"] == pm:
                cus["invoice_settings"]["default_payment_method"] = None
        return _public(existing)

    def _create_intent(self, params: dict[str, str]) -> Json:
        amount_text = params.get("amount", "")
        if not amount_text.isdigit():
            raise _invalid("Invalid integer: " + amount_text, param="amount")
        amount = int(amount_text)
        currency = params.get("currency", "")
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise _invalid(f"Invalid currency: {currency}", param="currency")
        if currency == "usd" and amount < _MIN_CENTS:
            raise _invalid(
                "Amount must be at least $0.50 usd", code="amount_too_small", param="amount"
            )
        confirm = params.get("confirm") == "true"
        off_session = params.get("off_session") == "true"
        if off_session and not confirm:
            raise _invalid(
                "You can only pass in `off_session` when `confirm` is true.", param="off_session"
            )
        redirects_allowed = (
            params.get("automatic_payment_methods[allow_redirects]") != "never"
            and "payment_method_types[0]" not in params
        )
        if confirm and redirects_allowed and "return_url" not in params:
            raise _invalid(
                "This PaymentIntent is configured to accept payment methods enabled in your "
                "Dashboard. Because some of these payment methods might redirect your customer "
                "off of your page, you must provide a `return_url`. If you don't want to "
                "accept redirect-based payment methods, set `automatic_payment_methods[enabled]`"
                " to `true` and `automatic_payment_methods[allow_redirects]` to `never`.",
            )
        cid = params.get("customer", "")
        self._customer_or_error(cid)
        pm_id = params.get("payment_method", "")
        pm = self._state.methods.get(pm_id)
        if pm is None:
            raise _invalid(
                f"No such PaymentMethod: '{pm_id}'",
                code="resource_missing",
                param="payment_method",
            )
        if pm["customer"] != cid:
            raise _invalid(
                f"The provided PaymentMethod {pm_id} does not belong to the Customer {cid}.",
                param="payment_method",
            )
        card = TEST_METHODS[pm["_card"]]

        intent: Json = {
            "id": _id("pi_"),
            "object": "payment_intent",
            "livemode": False,
            "amount": amount,
            "amount_received": 0,
            "currency": currency,
            "customer": cid,
            "payment_method": pm_id,
            "description": params.get("description"),
            "metadata": _metadata(params),
            "capture_method": "automatic",
            "confirmation_method": "automatic",
            "status": "requires_confirmation",
            "latest_charge": None,
            "last_payment_error": None,
        }
        self._intents.append(intent)
        if not confirm:
            return intent
        if self._forced_status:
            intent["status"] = self._forced_status.pop(0)
            return intent
        if not card.decline_code:
            intent.update(status="succeeded", amount_received=amount, latest_charge=_id("ch_"))
            return intent
        if card.decline_code == "authentication_required" and not off_session:
            intent["status"] = "requires_action"
            return intent
        # Off-session 3-D Secure is a card_error of its own code, not card_declined.
        auth = card.decline_code == "authentication_required"
        code = "authentication_required" if auth else "card_declined"
        error: Json = {
            "type": "card_error",
            "code": code,
            "decline_code": card.decline_code,
            "message": card.message,
            "charge": _id("ch_"),
        }
        intent.update(status="requires_payment_method", last_payment_error=dict(error))
        error["payment_intent"] = dict(intent)
        error["payment_method"] = _public(pm)
        raise _Error(402, error)


def _public(obj: Json) -> Json:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


class _Handler(BaseHTTPRequestHandler):
    owner: StripeFake

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode() if length else url.query
        params = dict(parse_qsl(raw, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, body, extra, delay = self.owner.handle(self.command, url.path, headers, params)
        if delay > 0:
            self.owner._release.wait(delay)
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            pass  # the client gave up (timed out) before the held response went out

    def log_message(self, format: str, *args: Any) -> None:
        pass
