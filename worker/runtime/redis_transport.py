"""A fix for kombu's Redis channels: a channel of a closed connection fails as a connection
error, never with ``AttributeError``.

When the broker goes away, Celery collects the broken connection, which detaches the
transport from it (``transport.client = None``), then closes it and connects anew. The old
channels live on: a channel that the collection could not close gives its unacknowledged
messages back when it is closed later, and a task that finishes after the reconnection
acknowledges its message on the channel it came from. Both build a Redis client from
``transport.client`` and fail with ``AttributeError: 'NoneType' object has no attribute
'hostname'``, which Celery does not take for a connection problem: the worker logs
"Unrecoverable error" and stops, or hangs in its warm stop, and consumes nothing.

As a connection error Celery logs it ("Couldn't ack") and carries on. The message stays in
Redis's set of unacknowledged messages, which Redis gives back after the visibility timeout;
the inbox re-drive republishes its events sooner. Tasks are idempotent, so a second run
changes nothing.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

CLOSED = "the broker connection of this channel is closed"


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise RedisConnectionError(CLOSED)
        params: dict[str, Any] = super()._connparams(  # type: ignore[no-untyped-call]
            asynchronous=asynchronous
        )
        return params


def use_fixed_channels(connection: Any) -> None:
    """Give a kombu connection on a Redis broker (``redis://``, ``rediss://``) these channels.

    Call before it connects; any other transport (Sentinel's has channels of its own) is left
    as it is.
    """
    transport = connection.transport
    if type(transport) is kombu_redis.Transport:
        transport.Channel = Channel
