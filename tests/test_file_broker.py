"""The embedded broker hands a consumer whole messages only, however large and however fast.

kombu's own file transport makes a message's file visible before writing it, so a consumer
polling at that moment decodes an empty or half-written file and its worker stops.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from kombu.connection import Connection

from tokenwarden.config.celery import transport_options
from tokenwarden.config.settings import Settings
from tokenwarden.worker.runtime import file_transport
from tokenwarden.worker.runtime.celery_app import make_celery

MESSAGES = 20
# Big enough that writing one message takes a while: the window a consumer used to hit.
BODY = {"event_ids": [f"evt-{i}" for i in range(200_000)]}


def _drain(options: dict[str, Any], got: list[Any], errors: list[str]) -> None:
    connection = Connection("filesystem://localhost/", transport_options=options)  # type: ignore[no-untyped-call]
    with connection:
        queue: Any = connection.SimpleQueue("tokenwarden-test")  # type: ignore[no-untyped-call]
        while len(got) + len(errors) < MESSAGES:
            try:
                message = queue.get(timeout=0.05)
            except queue.Empty:
                continue
            except Exception as error:  # what stopped the worker: a message it cannot read
                errors.append(f"{type(error).__name__}: {error}")
                continue
            message.ack()
            got.append(message.payload)


def test_a_consumer_polling_while_large_messages_are_written_reads_each_whole(
    tmp_path: Path,
) -> None:
    make_celery(Settings(home=tmp_path))  # what every process of ours does first
    options = transport_options(Settings(home=tmp_path)) | {"polling_interval": 0.0}
    got: list[Any] = []
    errors: list[str] = []
    consumer = threading.Thread(target=_drain, args=(options, got, errors), daemon=True)
    consumer.start()

    producer = Connection("filesystem://localhost/", transport_options=options)  # type: ignore[no-untyped-call]
    with producer:
        queue: Any = producer.SimpleQueue("tokenwarden-test")  # type: ignore[no-untyped-call]
        for _ in range(MESSAGES):
            queue.put(BODY)
    consumer.join(60)

    assert errors == []
    assert got == [BODY] * MESSAGES
    assert not list((tmp_path / "broker" / "queue").glob("*" + file_transport.PARTIAL_SUFFIX))


def test_the_apps_connections_use_the_atomic_transport(tmp_path: Path) -> None:
    app = make_celery(Settings(home=tmp_path))

    with app.connection_for_write() as connection:
        assert type(connection.transport) is file_transport.Transport
