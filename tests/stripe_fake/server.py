"""The fake's HTTP side: a ``ThreadingHTTPServer`` in a background thread, the bearer-key
check, Stripe's idempotency rules, the fault knobs, and the record of every request.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.stripe_fake.resources import Json, Resources, StripeError, new_id

API_KEY = "sk_test_fake_51Hx"


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


class StripeFake:
    """Start with ``with StripeFake() as fake:`` (or ``start()``/``stop()``); point the client
    at ``fake.url``."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._release = threading.Event()  # cuts held (delayed) responses short on stop
        self._resources = Resources()
        self._idempotency: dict[str, _Stored] = {}  # by key: what the first request got
        self._faults: list[_Fault] = []
        self._requests: list[RecordedRequest] = []
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
            self._resources.forced_status.append(status)

    def force_refund_status(self, status: str) -> None:
        """The next Refund created ends in ``status`` (``pending``, ``failed``, ...), HTTP 200."""
        with self._lock:
            self._resources.forced_refund_status.append(status)

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
            return [dict(pi) for pi in self._resources.intents]

    @property
    def charges(self) -> list[Json]:
        """PaymentIntents that captured money."""
        return [pi for pi in self.payment_intents if pi["status"] == "succeeded"]

    @property
    def refunds(self) -> list[Json]:
        """Every Refund created, failed ones included; replays create none."""
        with self._lock:
            return [dict(r) for r in self._resources.refunds]

    def customer(self, customer_id: str) -> Json:
        with self._lock:
            return copy.deepcopy(self._resources.customers[customer_id])

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
        request_id = new_id("req_", 14)
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

        if key is not None and key in self._idempotency:
            stored = self._idempotency[key]
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
                self._idempotency[key] = _Stored(
                    method, path, params, fault.status, body, request_id
                )
            return fault.status, body, extra, 0.0, False

        try:
            status, body = 200, self._resources.route(method, path, params)
        except StripeError as e:
            status, body = e.status, {"error": e.error}
        if key is not None:
            self._idempotency[key] = _Stored(method, path, params, status, body, request_id)
        delay = fault.delay_s if fault is not None else 0.0
        return status, body, extra, delay, False


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
