"""``authorize_protocol``: uvicorn's httptools protocol, answering ``POST /v1/authorizations``
itself, below ASGI (what ``meter run api`` serves; ``meter bench authorize`` measures it).

Profiled under the bench's load, the ASGI layer of an authorization cost the API about a third
of its CPU: a scope, an ``asyncio.Event``, a request-response cycle, ``receive`` and two
``send`` messages per request, and two writes (two system calls, two TCP segments the client
reads apart) for the status line and headers, then the body. This protocol answers the one
route from the parser's callbacks: the body is gathered as it arrives, one task computes the
answer with ``AuthorizeFastPath.answer`` (the same functions as the ASGI fast path and the
FastAPI route), and the whole response leaves in one write. Every other request, and an
authorization pipelined behind another request on its connection, is uvicorn's own path,
unchanged (the ASGI ``AuthorizeFastPath`` in front of FastAPI answers it the same).
"""

from __future__ import annotations

from typing import Final

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from enforcement.http.authorizations import AUTHORIZATIONS
from enforcement.http.fastpath import AuthorizeFastPath
from infra.http.bodies import MAX_BODY_BYTES

_PATH: Final = AUTHORIZATIONS.encode()
_JSON: Final = b"content-type: application/json\r\n"


class _Exchange:
    """The fast route's stand-in for uvicorn's ``RequestResponseCycle``: what the protocol's
    inherited code reads of a request in flight (``response_complete``, ``keep_alive``,
    ``disconnected``, ``message_event``)."""

    __slots__ = ("body", "disconnected", "keep_alive", "response_complete", "too_large")

    def __init__(self, keep_alive: bool) -> None:
        self.body = bytearray()
        self.too_large = False
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False

    @property
    def message_event(self) -> _Exchange:
        return self  # connection_lost sets it: nothing waits on it here

    def set(self) -> None:
        pass


def authorize_protocol(fast: AuthorizeFastPath) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` of a server of ``fast``."""

    class AuthorizeProtocol(HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            parser = self.parser
            previous = self.cycle
            if (
                self.url != _PATH
                or parser.get_method() != b"POST"
                or parser.get_http_version() != "1.1"
                or parser.should_upgrade()
                or self.expect_100_continue  # uvicorn's cycle answers "100 Continue"
                or not (previous is None or previous.response_complete)
            ):
                super().on_headers_complete()
                return
            self.cycle = _Exchange(parser.should_keep_alive())  # type: ignore[assignment]

        def on_body(self, body: bytes) -> None:
            ex = self.cycle
            if not isinstance(ex, _Exchange):
                super().on_body(body)
                return
            if ex.too_large or len(ex.body) + len(body) > MAX_BODY_BYTES:
                ex.too_large = True  # answered 413 once complete; the rest is dropped
                ex.body.clear()
            else:
                ex.body += body

        def on_message_complete(self) -> None:
            ex = self.cycle
            if not isinstance(ex, _Exchange):
                super().on_message_complete()
                return
            header = None
            for name, value in self.headers:
                if name == b"authorization":
                    header = value
                    break
            body = None if ex.too_large else bytes(ex.body)
            task = self.loop.create_task(self._answer(ex, header, body))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

        async def _answer(self, ex: _Exchange, header: bytes | None, body: bytes | None) -> None:
            status, extra, payload = await fast.answer(header, body)
            if self.flow.write_paused and not ex.disconnected:
                await self.flow.drain()  # a client that does not read its answers waits
            if ex.disconnected or self.transport.is_closing():
                return
            head: list[bytes] = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [_JSON, b"content-length: %d\r\n" % len(payload)]
            for k, v in extra.items():
                head += [k.lower().encode(), b": ", v.encode(), b"\r\n"]
            if not ex.keep_alive:
                head.append(b"connection: close\r\n")
            head += [b"\r\n", payload]
            self.transport.write(b"".join(head))
            ex.response_complete = True
            if not ex.keep_alive:
                self.transport.close()
            self.on_response_complete()

    return AuthorizeProtocol
