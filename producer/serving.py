"""How ``tokenwarden api`` serves the producer API: uvicorn's options and a guarded protocol.

The API faces callers it cannot trust (GitHub's endpoint is open to anyone who can reach it),
so what one connection can hold is bounded:

- **Headers** must be complete within :data:`HEADER_TIMEOUT_S` of the connection opening or
  of their first byte. uvicorn itself has no such limit: its keep-alive timer is armed only
  after an answer and disarmed by any byte received, so a client dripping header lines
  holds a connection for as long as it likes. :class:`GuardedH11Protocol` adds it.
- **A body** must be complete within :data:`BODY_TIMEOUT_S` of its headers, else ``408``.
- **An answer given before the body was read** (a refusal: unknown key, too large, no
  credentials) carries ``Connection: close`` and the connection is closed after it, so the
  rest of the body is never read, and a client cannot keep the connection by sending it
  slowly.
- **Connections**: at most :data:`LIMIT_CONCURRENCY` at once; uvicorn answers ``503`` to a
  request beyond that, so memory stays bounded however many connect.

With ``--workers N`` (``TOKENWARDEN_API_WORKERS``) uvicorn binds the port once and starts N
processes that accept on it, each loading the app from :data:`APP_FACTORY`. The options
above travel to each of them, the guarded protocol included, and every bound holds per
process: N processes take N times :data:`LIMIT_CONCURRENCY` connections.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
from typing import TYPE_CHECKING, Any, Final, overload

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from fastapi import FastAPI

# Seconds a client has to send a request's headers, from the moment the connection opened or
# their first byte came.
HEADER_TIMEOUT_S: Final = 10.0
# Seconds a client has to send a request's body once its headers are in: 1 MiB, the largest
# body the API takes, in 20 s is 50 kB/s.
BODY_TIMEOUT_S: Final = 20.0
# Set in a request's ``scope["state"]`` when its body came too late and was answered 408.
BODY_TIMED_OUT: Final = "tokenwarden_body_timed_out"
# Connections (idle keep-alive ones included) and requests in progress at once; uvicorn
# answers 503 to a request beyond. Thirty-two connections already saturate the API.
LIMIT_CONCURRENCY: Final = 1000
# Seconds an idle keep-alive connection stays open (uvicorn's default).
TIMEOUT_KEEP_ALIVE_S: Final = 5
# The largest request line plus headers; a larger one is answered 400 (h11's default).
MAX_HEADER_BYTES: Final = 16 * 1024
# Bytes read from a connection at once (asyncio's selector transport reads 256 KiB).
READ_SIZE: Final = 64 * 1024
# Connections the kernel queues before the API accepts them (uvicorn's default).
BACKLOG: Final = 2048
# What each process of ``tokenwarden api --workers N`` (N > 1) serves, as uvicorn imports it.
APP_FACTORY: Final = "tokenwarden.producer.serving:app_of_one_process"


class _ClosingConnection(h11.Connection):
    """An h11 server connection that closes after answering a request whose body is unread.

    Answering before the body has arrived is a refusal (the app would have read it
    otherwise); the answer says ``Connection: close`` and h11 then makes uvicorn close the
    connection, rather than read and drop the rest of a body nobody wants.
    """

    @overload
    def send(self, event: h11.ConnectionClosed) -> None: ...
    @overload
    def send(
        self,
        event: h11.Request | h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage,
    ) -> bytes: ...
    @overload
    def send(self, event: h11.Event) -> bytes | None: ...
    def send(self, event: h11.Event) -> bytes | None:
        if isinstance(event, h11.Response) and self.their_state is h11.SEND_BODY:
            headers = [(name, value) for name, value in event.headers if name != b"connection"]
            event = h11.Response(
                status_code=event.status_code,
                headers=[*headers, (b"connection", b"close")],
                reason=event.reason,
                http_version=event.http_version,
            )
        return super().send(event)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with deadlines for the headers and the body of each request.

    Each deadline is a timer armed only while the client owes us something: from connecting
    until the first request's headers, and from a read that left headers or a body
    incomplete until they are in; none at all for a request that comes in one read, as most
    do. Silence between requests is uvicorn's keep-alive timeout.
    """

    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _ClosingConnection(
            h11.SERVER, self.config.h11_max_incomplete_event_size or MAX_HEADER_BYTES
        )
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if hasattr(transport, "max_size"):
            # asyncio reads 256 KiB at a time, and uvicorn keeps a read whole before it stops
            # reading a body the app has not asked for: smaller reads bound what each of
            # many connections holds.
            transport.max_size = READ_SIZE
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:
            # Part of a request's headers: uvicorn's keep-alive timer, which covered the
            # silence before them, is now off.
            if not self.transport.is_closing():
                self._await_headers()
        elif self._header_timer is not None:
            self._header_timer.cancel()  # the request line and headers are in
            self._header_timer = None
        if state is h11.SEND_BODY:
            if self._body_timer is None and not self.transport.is_closing():
                self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_late)
        elif self._body_timer is not None:
            self._body_timer.cancel()  # the body is in
            self._body_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        pending, _ = self.conn.trailing_data
        if pending:  # part of a request came: say why it is cut off
            reason = f"the request headers took over {self.header_timeout_s:g} s"
            self.transport.write(_timed_out(reason))
        self.transport.close()

    def _body_late(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if cycle is not None and not cycle.response_started:
            # Answer for the app, which is still waiting for the body: from now on it sees a
            # client that left (and the metrics count a 408, see producer.api).
            cycle.scope["state"][BODY_TIMED_OUT] = True
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(_timed_out(f"the body took over {self.body_timeout_s:g} s"))
        self.transport.close()


def _timed_out(reason: str) -> bytes:
    text = reason.encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(text), text)
    )


def uvicorn_options(*, workers: int = 1) -> dict[str, Any]:
    """The options ``uvicorn.run`` serves the producer API with, in ``workers`` processes.

    ``workers`` is always given: left out, uvicorn would take ``WEB_CONCURRENCY`` from the
    environment instead, and refuse an app object when that says more than one.
    """
    return {
        "workers": workers,
        "access_log": False,
        "http": GuardedH11Protocol,
        "limit_concurrency": LIMIT_CONCURRENCY,
        "timeout_keep_alive": TIMEOUT_KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "backlog": BACKLOG,
    }


def app_of_one_process() -> FastAPI:
    """The producer API in one of the processes of ``--workers N``.

    The settings are read from the environment, which the process inherited from the
    ``tokenwarden api`` that checked them.
    """
    from tokenwarden.producer.api import create_app

    prepare_process()
    return create_app()


def prepare_process() -> None:
    """Set up one of the processes of ``--workers N``, before its app is built.

    Each is a fresh interpreter (spawned, not forked), so our logging is set up again, at
    the level uvicorn was given: it sets its own loggers to it in every process before it
    loads the app. That setup hands uvicorn's loggers to ours, the access log included, which
    ``access_log=False`` had switched off: it is switched off again.
    """
    from tokenwarden.config.logging import configure_logging

    _end_with_supervisor()
    level = logging.getLogger("uvicorn.error").getEffectiveLevel()
    configure_logging(level=logging.getLevelName(level))
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False


def _end_with_supervisor() -> None:
    """On Linux, have the kernel send SIGTERM when the supervisor of ``--workers N`` dies.

    The supervisor stops its processes when it is told to stop; killed outright (SIGKILL),
    it could not, and they would go on accepting on the port.
    """
    from tokenwarden.worker.ops.supervisor import signal_when_parent_dies

    parent = multiprocessing.parent_process()
    if parent is None or not signal_when_parent_dies(signal.SIGTERM):
        return
    if not parent.is_alive():
        signal.raise_signal(signal.SIGTERM)
