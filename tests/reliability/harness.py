"""A live stack to inject faults into, and the instruments around it.

:class:`ChaosStack` is the end-to-end suite's :class:`~tests.stack.LiveStack` (real API,
worker and scheduler processes on a queue of their own) plus what the reliability tests need:
workers under any name, a look at the messages waiting on the queue (kept as evidence for the
secrets check), raw publishing straight onto the queue, a webhook receiver, and a feeder that
sends a workload through the Python producer client while faults happen.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from kombu.connection import Connection
from sqlalchemy import func, select, text
from standardwebhooks.webhooks import Webhook

from tests.reliability.evidence import Evidence
from tests.stack import KEY, LiveStack, stack_env
from tokenwarden.config.celery import transport_options
from tokenwarden.config.settings import Settings
from tokenwarden.producer.client import ProducerClient, ProducerError
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import EventStatus, InboxEvent, Notice
from tokenwarden.worker.ops.supervisor import command, free_port, wait_for_http

SIGNING_SECRET = "whsec_" + "dHdjaGFvcy1zaWduaW5nLXNlY3JldC0wMTIzNDU2Nzg5"
PROCESS_EVENTS = "tokenwarden.process_events"
UNRECOVERABLE = "Unrecoverable error"  # Celery's last words before a worker stops
RUN = "run"  # the log (and process) of ``tokenwarden run``
READY = re.compile(r"\S+@\S+ ready\.")  # logged once per start, when it consumes
RECEIVED = re.compile(r"Task (tokenwarden\.[a-z_]+)\[[0-9a-f-]+\] received")
# Long enough that a busy worker's queue does not make every re-drive a copy of the backlog,
# short enough that each test sees the re-drive run many times.
REDRIVE_AFTER_S = 5


@dataclass
class ChaosStack(LiveStack):
    broker_url: str = "filesystem://localhost/"
    restarts: dict[str, int] = field(default_factory=dict)
    peeked: int = 0
    _ready_before: dict[str, int] = field(default_factory=dict)

    def start_worker(
        self, name: str = "worker", *, concurrency: int = 2, own_node: bool = False
    ) -> None:
        """A worker process under ``name``, so several can run and die independently.

        ``tokenwarden worker`` names every worker ``celery@HOST``; a second one on the same
        host and RabbitMQ fails on the first's exclusive control queue. ``own_node`` starts
        the same worker through ``celery`` itself, with a node name of its own.
        """
        self._ready_before[name] = len(READY.findall(self.log(name)))
        if not own_node:
            self._start(name, command("worker", "--concurrency", str(concurrency)))
            return
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tokenwarden.worker.runtime.celery_app",
            "--quiet",
            "worker",
            "--loglevel",
            "info",
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        self._start(name, argv)

    def wait_ready(self, name: str = "worker", *, timeout: float = 60) -> None:
        """Wait until the worker last started under ``name`` consumes from the queue."""
        self.wait_for(
            lambda: len(READY.findall(self.log(name))) > self._ready_before.get(name, 0),
            timeout=timeout,
            message=f"{name} to be ready",
        )

    def _start(self, name: str, argv: Sequence[str]) -> None:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{name}.log").open("ab") as out:
            self.processes[name] = subprocess.Popen(
                list(argv),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
            )
        self.restarts[name] = self.restarts.get(name, -1) + 1

    def start_run(self) -> None:
        """``tokenwarden run``: the API, a worker and the scheduler under its supervision.

        The product restarts a worker that exits or stops consuming; the test only watches.
        Everything the children print goes to the ``run`` log.
        """
        self._ready_before[RUN] = 0
        env = dict(self.env)
        env.update({"TOKENWARDEN_API_HOST": "127.0.0.1", "TOKENWARDEN_API_PORT": str(self.port)})
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{RUN}.log").open("ab") as out:
            self.processes[RUN] = subprocess.Popen(
                command("run", "--json"),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
            )
        if not wait_for_http(f"{self.api_url}/healthz", 60):
            raise AssertionError(f"tokenwarden run did not start:\n{self.log(RUN)[-4000:]}")

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def logs(self) -> str:
        folder = self.home / "logs"
        if not folder.exists():
            return ""
        return "".join(path.read_text(errors="replace") for path in sorted(folder.glob("*.log")))

    def statuses(self) -> dict[str, int]:
        with self.session() as session:
            rows = session.execute(
                select(InboxEvent.status, func.count()).group_by(InboxEvent.status)
            ).all()
        return dict(rows)

    def pending(self) -> int:
        return self.statuses().get(EventStatus.PENDING.value, 0)

    def wait_settled(
        self, expected: int, *, timeout: float, tick: Callable[[], object] | None = None
    ) -> dict[str, int]:
        """Wait until ``expected`` events are stored and none is pending; return the counts.

        ``tick`` is called on every poll (to revive a stuck worker, say).
        """
        deadline = time.monotonic() + timeout
        while True:
            if tick is not None:
                tick()
            try:
                counts = self.statuses()
            except Exception:  # the store may be restarting under the test
                counts = {}
            stored = sum(counts.values())
            if counts and stored >= expected and not counts.get(EventStatus.PENDING.value):
                return counts
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not settled after {timeout:.0f}s: {counts} of {expected}\n"
                    f"{self.logs()[-3000:]}"
                )
            time.sleep(0.25)

    def notices_settled(self) -> bool:
        """No notice is waiting for its delivery."""
        with self.session() as session:
            waiting = session.scalar(
                select(func.count()).select_from(Notice).where(Notice.status == "pending")
            )
        return not waiting

    def connection(self) -> Connection:
        settings = Settings(home=self.home, broker_url=self.env.get("TOKENWARDEN_BROKER_URL"))
        return Connection(  # type: ignore[no-untyped-call]
            settings.resolved_broker_url, transport_options=transport_options(settings)
        )

    def publish_raw(
        self,
        body: str | bytes,
        *,
        task: str | None = PROCESS_EVENTS,
        content_type: str = "application/json",
        content_encoding: str = "utf-8",
        headers: Mapping[str, Any] | None = None,
        connection: Connection | None = None,
    ) -> str:
        """Put a message straight on the queue, as a misbehaving producer would; its id."""
        message_id = str(uuid.uuid4())
        sent: dict[str, Any] = {
            "id": message_id,
            "lang": "py",
            "argsrepr": "",
            "kwargsrepr": "",
            "retries": 0,
            "eta": None,
            "expires": None,
        }
        if task is not None:
            sent["task"] = task
        sent.update(headers or {})
        with _maybe(connection, self.connection) as conn:
            conn.Producer().publish(  # type: ignore[no-untyped-call]
                body,
                routing_key=self.queue,
                exchange="",
                content_type=content_type,
                content_encoding=content_encoding,
                serializer=None,
                headers=sent,
                declare=[],
                retry=True,
            )
        return message_id

    def publish_ids(
        self, event_ids: Sequence[str], *, connection: Connection | None = None
    ) -> None:
        """A well-formed ``process_events`` message, as the API or the re-drive sends it."""
        body = json.dumps([[list(event_ids)], {}, {"callbacks": None, "errbacks": None}])
        self.publish_raw(body, connection=connection)

    def peek_queue(self) -> list[dict[str, Any]]:
        """The messages waiting on the queue now, as ``{"headers", "body"}``; none removed."""
        url = self.broker_url
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url)
            return [decode_envelope(raw) for raw in client.lrange(self.queue, 0, -1)]
        if url.startswith("filesystem://"):
            folder = Settings(home=self.home).broker_folder / "queue"
            found = []
            for path in sorted(folder.glob(f"*.{self.queue}.msg")):
                with suppress(OSError, ValueError):  # taken by a worker meanwhile
                    found.append(decode_envelope(path.read_bytes()))
            return found
        # AMQP: take each message without acknowledging it; closing the channel puts them
        # all back on the queue.
        peeked = []
        with self.connection() as conn:
            channel = conn.channel()
            try:
                while (message := channel.basic_get(self.queue, no_ack=False)) is not None:
                    body = message.body
                    peeked.append(
                        {
                            "headers": message.headers,
                            "body": body.decode(errors="replace")
                            if isinstance(body, bytes)
                            else body,
                        }
                    )
            finally:
                channel.close()
        return peeked

    def keep_queue(self, evidence: Evidence, label: str) -> int:
        """Put what the queue holds now into the evidence; how many messages that was."""
        try:
            messages = self.peek_queue()
        except Exception as error:
            evidence.keep_text("queue", label, f"queue not readable: {error}")
            return 0
        evidence.keep_text("queue", label, "\n".join(json.dumps(m, default=str) for m in messages))
        self.peeked += len(messages)
        return len(messages)

    def received(self) -> dict[str, int]:
        """Messages the workers took so far, by task (a message given back counts again)."""
        tally: dict[str, int] = {}
        for match in RECEIVED.finditer(self.logs()):
            name = match.group(1).removeprefix("tokenwarden.")
            tally[name] = tally.get(name, 0) + 1
        return tally

    def delete_queue(self) -> None:
        with self.connection() as conn, suppress(Exception):
            conn.channel().queue_delete(self.queue)


@contextmanager
def _maybe(connection: Connection | None, make: Callable[[], Connection]) -> Iterator[Connection]:
    if connection is not None:
        yield connection
        return
    with make() as made:
        yield made


def decode_envelope(raw: str | bytes) -> dict[str, Any]:
    """A message as a virtual transport (Redis, files) stores it: JSON, body in base64."""
    envelope = json.loads(raw)
    body = envelope.get("body", "")
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body).decode(errors="replace")
    return {"headers": envelope.get("headers"), "body": body}


class WebhookReceiver:
    """A notice receiver on 127.0.0.1: checks every signature and records every delivery."""

    def __init__(self, secret: str = SIGNING_SECRET, *, fail_first: float = 0.0) -> None:
        self.port = free_port()
        self.verifier = Webhook(secret)
        self.lock = threading.Lock()
        self.deliveries: list[tuple[str, str]] = []
        self.bad_signatures = 0
        self.refused_on_purpose = 0
        self._fail_first = fail_first
        self._seen: set[str] = set()
        self._random = random.Random(1)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode(errors="replace")
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver.receive(headers, body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/notices"

    def receive(self, headers: dict[str, str], body: str) -> int:
        try:
            self.verifier.verify(body, headers)
        except Exception:
            with self.lock:
                self.bad_signatures += 1
            return 400
        notice_id = headers.get("webhook-id", "")
        with self.lock:
            first = notice_id not in self._seen
            self._seen.add(notice_id)
            if first and self._random.random() < self._fail_first:
                # A receiver that fails now and then: the sender must retry with the same id.
                self.refused_on_purpose += 1
                return 503
            self.deliveries.append((notice_id, body))
        return 204

    def delivered(self) -> dict[str, int]:
        with self.lock:
            counts: dict[str, int] = {}
            for notice_id, _ in self.deliveries:
                counts[notice_id] = counts.get(notice_id, 0) + 1
            return counts

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def chaos_stack(
    home: Path,
    *,
    evidence: Evidence,
    label: str,
    database_url: str | None = None,
    broker_url: str | None = None,
    webhook_url: str | None = None,
    roles: Sequence[str] = ("api", "worker", "beat"),
    env: Mapping[str, str] | None = None,
) -> Iterator[ChaosStack]:
    """A migrated store and a running stack; logs, a dump and the queue kept as evidence."""
    extra: dict[str, str] = {
        "TOKENWARDEN_NOTICE_SIGNING_SECRET": SIGNING_SECRET,
        "TOKENWARDEN_REDRIVE_AFTER_S": str(REDRIVE_AFTER_S),
    }
    if database_url:
        extra["TOKENWARDEN_DATABASE_URL"] = database_url
    if broker_url:
        extra["TOKENWARDEN_BROKER_URL"] = broker_url
    if webhook_url:
        extra["TOKENWARDEN_NOTICE_WEBHOOK_URL"] = webhook_url
    extra.update(env or {})
    home.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=home, database_url=database_url, broker_url=broker_url)
    stack = ChaosStack(
        home=home,
        env=stack_env(home, extra),
        database_url=settings.resolved_database_url,
        port=free_port(),
        broker_url=settings.resolved_broker_url,
    )
    db.upgrade(stack.database_url)
    try:
        for role in roles:
            if role == "worker":
                stack.start_worker("worker")
            else:
                stack.start(role)
        yield stack
    finally:
        stopping = time.monotonic()
        stack.stop()
        print(f"{label}: processes stopped in {time.monotonic() - stopping:.1f}s")
        for path in sorted((home / "logs").glob("*.log")):
            evidence.keep_file("logs", f"{label}-{path.name}", path)
        with suppress(Exception):
            evidence.keep_database(label, stack.engine)
        stack.keep_queue(evidence, f"{label}-end")
        with suppress(Exception):
            stack.delete_queue()
        db.engine_for(stack.database_url).dispose()
        print(f"{label}: torn down in {time.monotonic() - stopping:.1f}s")


def kill_group(process: subprocess.Popen[bytes], signum: int = signal.SIGKILL) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
    process.wait(timeout=30)


class Feeder(threading.Thread):
    """Sends events in batches through the Python producer client, at a chosen pace.

    Records every accepted id, how often the client had to wait and retry, and any batch
    the client gave up on (a loss the test reports).
    """

    def __init__(
        self,
        api_url: str,
        events: Sequence[dict[str, Any]],
        *,
        batch: int = 100,
        pause_s: float = 0.0,
        attempts: int = 30,
    ) -> None:
        super().__init__(daemon=True)
        self.api_url = api_url
        self.events = list(events)
        self.batch = batch
        self.pause_s = pause_s
        self.attempts = attempts
        self.accepted: list[str] = []
        self.retries = 0
        self.failures: list[str] = []
        self.sent_batches = 0

    def _sleep(self, seconds: float) -> None:
        self.retries += 1
        time.sleep(min(seconds, 2.0))

    def run(self) -> None:
        with ProducerClient(
            self.api_url, KEY, attempts=self.attempts, backoff=0.2, sleep=self._sleep, timeout=15
        ) as client:
            for start in range(0, len(self.events), self.batch):
                part = self.events[start : start + self.batch]
                try:
                    self.accepted += client.send(part)
                except ProducerError as error:
                    self.failures.append(f"batch at {start}: {error}")
                self.sent_batches += 1
                if self.pause_s:
                    time.sleep(self.pause_s)


def database_reachable(url: str) -> bool:
    try:
        with db.engine_for(url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        return False
    return True


class Prober(threading.Thread):
    """Sends one small event every ``every_s`` with plain HTTP and records every answer.

    Each probe is a ``membership.added`` in an organization of its own, so the probes never
    meet the workload; each answer is kept as (seconds since start, status, Retry-After).
    """

    def __init__(self, api_url: str, prefix: str, *, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.api_url = api_url
        self.prefix = prefix
        self.every_s = every_s
        self.answers: list[tuple[float, int, str | None]] = []
        self.accepted: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        number = 0
        with httpx.Client(
            base_url=self.api_url, timeout=20, headers={"Authorization": f"Bearer {KEY}"}
        ) as client:
            while not self.stopping.is_set():
                number += 1
                event_id = f"{self.prefix}-probe{number}"
                body = {
                    "specversion": "1.0",
                    "id": event_id,
                    "source": "chaos://probe",
                    "type": "membership.added",
                    "data": {
                        "org_id": f"{self.prefix}-probes",
                        "user_id": f"p{number}",
                        "role": "user",
                    },
                }
                try:
                    response = client.post("/v1/events", json=body)
                except httpx.HTTPError:
                    self.answers.append((time.monotonic() - started, 0, None))
                else:
                    status = response.status_code
                    self.answers.append(
                        (time.monotonic() - started, status, response.headers.get("retry-after"))
                    )
                    if status == 202:
                        self.accepted.append(event_id)
                self.stopping.wait(self.every_s)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for _, status, _ in self.answers:
            counts[status] = counts.get(status, 0) + 1
        return counts
