"""From a leak reported through ``POST /v1/events`` to its signed notice at the webhook.

A real API (``tokenwarden api``) and worker (as ``tokenwarden worker``: prefork, one process
per core) on the run's own database and queue, posting notices to a receiver in this process:
an HTTP server on loopback that verifies each notice's Standard Webhooks signature (a notice
that does not verify is refused) and notes when it arrived. Each run sends single
``token.leak_suspected`` events, each carrying one personal token's plain text (the API hashes
it), on a fixed schedule at ``--rate`` for ``--seconds``; the latency of a leak runs from the
moment its request is sent to the arrival of the first notice naming its token. A leak whose
notice never arrives, or a notice whose signature does not verify, fails the benchmark.
Each leaked token's owner also has an email address, and the worker mails the notice
through an SMTP server in this process (aiosmtpd on loopback): the email latency runs from
the same request to the arrival of the owner's mail. Reported: the medians over runs of each
run's p50 and p99, for the webhook and for email. No baseline; ``ok`` when both p99 <= 1 s.

    .venv/bin/python bench/notices.py [--runs 3] [--seconds 10] [--rate 25]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import base64
import functools
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bench import common
from tokenwarden.worker.ops.supervisor import free_port

NAME: Final = "notices"
P99_S: Final = 1.0
UNIT: Final = "s"
WARM_LEAKS: Final = 10


@dataclass
class Run:
    rate: float
    latencies_s: list[float]
    duplicates: int
    mail_latencies_s: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return common.percentile(self.latencies_s, 0.50)

    @property
    def p99(self) -> float:
        return common.percentile(self.latencies_s, 0.99)

    @property
    def mail_p50(self) -> float:
        return common.percentile(self.mail_latencies_s, 0.50)

    @property
    def mail_p99(self) -> float:
        return common.percentile(self.mail_latencies_s, 0.99)


@dataclass
class MailSink:
    """The SMTP server: notes the first mail to each address, and when it arrived."""

    arrived: dict[str, float] = field(default_factory=dict)  # address -> perf_counter
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.perf_counter()
        with self.lock:
            for address in envelope.rcpt_tos:
                self.arrived.setdefault(address, now)
        return "250 OK"

    def count(self, addresses: list[str]) -> int:
        with self.lock:
            return sum(1 for address in addresses if address in self.arrived)

    def __enter__(self) -> MailSink:
        from aiosmtpd.controller import Controller

        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.controller.stop()


@dataclass
class Receiver:
    """The webhook: verifies every signature, notes the first arrival of each token's notice."""

    secret: str
    arrived: dict[str, float] = field(default_factory=dict)  # token id -> perf_counter
    notices: dict[str, int] = field(default_factory=dict)  # webhook-id -> deliveries
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.webhook = Webhook(self.secret)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps the worker's connection open, as is usual

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                now = time.perf_counter()
                status = receiver.receive(body, dict(self.headers.items()), now)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/notices"

    def receive(self, body: bytes, headers: dict[str, str], now: float) -> int:
        headers = {name.lower(): value for name, value in headers.items()}
        notice_id = headers.get("webhook-id", "")
        try:
            self.webhook.verify(body, headers)
            tokens = json.loads(body)["data"]["tokens"]
        except (WebhookVerificationError, ValueError, KeyError, TypeError) as error:
            with self.lock:
                self.refused.append(f"{notice_id or 'no webhook-id'}: {error}")
            return 401
        with self.lock:
            self.notices[notice_id] = self.notices.get(notice_id, 0) + 1
            for token in tokens:
                self.arrived.setdefault(token["id"], now)
        return 204

    def count(self, token_ids: list[str]) -> int:
        with self.lock:
            return sum(1 for token_id in token_ids if token_id in self.arrived)

    def duplicates(self) -> int:
        with self.lock:
            return sum(count - 1 for count in self.notices.values())

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def leak(member: common.Member, tag: str, at: str) -> bytes:
    body = {
        "specversion": "1.0",
        "id": f"evt-{tag}-{member.user_id}",
        "source": "bench://notices",
        "type": "token.leak_suspected",
        "time": at,
        "data": {"token": member.pat_texts[0], "reporter": "bench"},
    }
    return json.dumps(body).encode()


def address(member: common.Member) -> str:
    return f"{member.user_id}@{member.org_id}.example"


def leak_run(
    receiver: Receiver,
    sink: MailSink,
    port: int,
    members: list[common.Member],
    *,
    rate: float,
    connections: int,
    tag: str,
    children: list[common.Child],
) -> tuple[list[float], list[float]]:
    """Report each member's leak at ``rate``; the seconds from each report to its notice at
    the webhook, and to its mail."""
    at = datetime.now(UTC).isoformat()
    start = time.perf_counter() + 0.2
    sent: dict[str, float] = {}
    schedule = [
        common.Timed(
            start + index / rate,
            common.http_request(port, "/v1/events", leak(member, tag, at)),
            before=functools.partial(common.stamp, sent, member.pats[0]),
        )
        for index, member in enumerate(members)
    ]
    token_ids = [member.pats[0] for member in members]
    addresses = [address(member) for member in members]
    asyncio.run(common.paced(port, schedule, connections))
    try:
        common.wait_until(
            lambda: (
                (
                    receiver.count(token_ids) >= len(token_ids)
                    and sink.count(addresses) >= len(addresses)
                )
                or bool(receiver.refused)
            ),
            timeout_s=60,
            what="a notice for every leak",
            interval_s=0.05,
            watch=children,
        )
    except common.BenchError as error:
        missing = len(token_ids) - receiver.count(token_ids)
        unmailed = len(addresses) - sink.count(addresses)
        raise common.BenchError(
            f"{missing} of {len(token_ids)} notices and {unmailed} mails missing: {error}"
        ) from None
    if receiver.refused:
        raise common.BenchError(
            f"{len(receiver.refused)} notice(s) not properly signed, e.g. {receiver.refused[0]}"
        )
    with receiver.lock:
        hooks = [receiver.arrived[token_id] - sent[token_id] for token_id in token_ids]
    with sink.lock:
        mails = [sink.arrived[address(member)] - sent[member.pats[0]] for member in members]
    return hooks, mails


def options(argv: list[str] | None) -> argparse.Namespace:
    parsed = common.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    parsed.add_argument("--seconds", type=float, default=None, help="leaks sent per run (10 s)")
    parsed.add_argument("--rate", type=float, default=None, help="leaks per second (25)")
    parsed.add_argument("--connections", type=int, default=2, help="client connections (2)")
    common.stack_options(parsed)
    args = common.parse(parsed, argv)
    args.seconds = args.seconds or common.pick(args, 10, 2)
    args.rate = args.rate or common.pick(args, 25, 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    runs: list[Run] = []
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    try:
        with common.bench(NAME, args) as run, Receiver(secret) as receiver, MailSink() as sink:
            engine = run.engine()
            port = free_port()
            logs = run.home / "logs"
            env = run.child_env(
                TOKENWARDEN_NOTICE_WEBHOOK_URL=receiver.url,
                TOKENWARDEN_NOTICE_SIGNING_SECRET=secret,
                TOKENWARDEN_SMTP_URL=f"smtp://127.0.0.1:{sink.port}",
                TOKENWARDEN_MAIL_FROM="tokenwarden@bench.example",
            )
            api = common.api_child(args, port, env, logs)
            worker = common.worker_child(args, env, logs)
            with api, worker:
                common.wait_for_http(f"http://127.0.0.1:{port}/healthz", api)
                children = [api, worker]
                count = max(1, int(args.rate * args.seconds))
                pool = common.populate(
                    engine,
                    users=WARM_LEAKS + count * args.runs,
                    pats=1,
                    aats=0,
                    texts=True,
                    emails=True,
                )
                warm, pool = pool[:WARM_LEAKS], pool[WARM_LEAKS:]
                # The first notices wait for the worker to start and connect: not measured.
                leak_run(
                    receiver,
                    sink,
                    port,
                    warm,
                    rate=args.rate,
                    connections=args.connections,
                    tag="warm",
                    children=children,
                )
                for number in range(args.runs):
                    members, pool = pool[:count], pool[count:]
                    latencies, mails = leak_run(
                        receiver,
                        sink,
                        port,
                        members,
                        rate=args.rate,
                        connections=args.connections,
                        tag=f"run-{number}",
                        children=children,
                    )
                    runs.append(Run(args.rate, latencies, receiver.duplicates(), mails))
                    print(
                        f"  run {number + 1}: {count} leaks at {args.rate:g}/s: "
                        f"webhook p50 {runs[-1].p50:.3f} s, p99 {runs[-1].p99:.3f} s; "
                        f"email p50 {runs[-1].mail_p50:.3f} s, p99 {runs[-1].mail_p99:.3f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    except (common.BenchError, OSError) as error:
        return common.failed(NAME, error, unit=UNIT, target=P99_S)
    p50 = common.median([r.p50 for r in runs])
    p99 = common.median([r.p99 for r in runs])
    mail_p50 = common.median([r.mail_p50 for r in runs])
    mail_p99 = common.median([r.mail_p99 for r in runs])
    print(
        f"leak reported (POST /v1/events) -> signed notice received / owner's mail received, "
        f"single events, {args.runs} run(s) of {args.seconds:g} s at {args.rate:g} leaks/s; "
        f"worker {args.pool} x{args.concurrency}"
    )
    rows: list[list[Any]] = [
        [n + 1, len(r.latencies_s), r.p50, r.p99, max(r.latencies_s), r.mail_p50, r.mail_p99]
        for n, r in enumerate(runs)
    ]
    rows.append(["median", None, p50, p99, None, mail_p50, mail_p99])
    print(
        common.table(
            ["run", "notices", "p50 s", "p99 s", "max s", "email p50 s", "email p99 s"], rows
        )
    )
    outcome = common.result(
        NAME,
        value=p99,
        baseline=None,
        ratio=None,
        target=P99_S,
        ok=p99 <= P99_S and mail_p99 <= P99_S,
        unit=UNIT,
        p50_s=common.rounded(p50, 3),
        p99_s=common.rounded(p99, 3),
        email_p50_s=common.rounded(mail_p50, 3),
        email_p99_s=common.rounded(mail_p99, 3),
        notices=sum(len(r.latencies_s) for r in runs),
        duplicates=runs[-1].duplicates if runs else 0,
        rate=args.rate,
        runs=args.runs,
        short=args.short,
    )
    return common.finish(outcome, short=args.short)


if __name__ == "__main__":
    sys.exit(main())
