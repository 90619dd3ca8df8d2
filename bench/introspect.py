"""Token introspection (``POST /v1/introspect``): rate, latency, and revocations seen by replicas.

1. **Saturation**: introspections/s of ``tokenwarden api`` (one process, as deployed) over 32
   keep-alive connections, asking about 1,000 active tokens in turn, against the empty
   ``POST /v1/introspect`` of ``bench/_empty_api.py`` on the same server settings, same run.
   Target: ratio ≥ 0.5.
2. **Latency** at half the saturated rate, paced: p99 ≤ 5 ms.
3. **Revocation visibility** (Postgres only): two API processes on one store; a token is
   warmed into both caches, revoked by the domain in this process, and the *other* replica is
   polled until it answers ``{"active": false}``; time from the commit. Target: p99 ≤ 100 ms.
   On SQLite this part is skipped (one machine: see README, Introspection).

    .venv/bin/python bench/introspect.py [--runs 3] [--requests 20000] [--revocations 100]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import time
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlencode

import httpx

from bench import common
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.revocation import revoke_token
from tokenwarden.worker.ops.supervisor import free_port

NAME: Final = "introspect"
RATIO_TARGET: Final = 0.5
P99_TARGET_MS: Final = 5.0
VISIBLE_TARGET_MS: Final = 100.0
UNIT: Final = "introspections/s"
KEY: Final = "twi_bench_introspection_key"
TOKENS: Final = 1000


def request(port: int, token: str) -> bytes:
    body = urlencode({"token": token}).encode()
    head = (
        f"POST /v1/introspect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def saturate(port: int, texts: list[str], count: int, connections: int) -> float:
    sent = [request(port, texts[i % len(texts)]) for i in range(count)]
    load = common.http_load(port, sent, connections=connections)
    if set(load.statuses) != {200}:
        raise common.BenchError(f"answers other than 200: {load.statuses}")
    return load.requests / load.seconds


def paced_p99_ms(port: int, texts: list[str], rate: float, seconds: float) -> float:
    """p99 latency (ms) of requests sent at ``rate`` per second over 16 connections."""
    count = max(1, int(rate * seconds))
    latencies: list[float] = []

    async def run() -> None:
        start = time.perf_counter() + 0.05
        due = iter(range(count))

        async def client() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                for number in due:
                    delay = start + number / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    sent = time.perf_counter()
                    writer.write(request(port, texts[number % len(texts)]))
                    status, _ = await common.read_response(reader)
                    if status != 200:
                        raise common.BenchError(f"an answer {status}")
                    latencies.append(time.perf_counter() - sent)
            finally:
                writer.close()

        await asyncio.gather(*(client() for _ in range(16)))

    asyncio.run(run())
    return 1000 * common.percentile(latencies, 0.99)


def visibility_ms(run: common.Bench, ports: list[int], members: list[common.Member]) -> list[float]:
    """Commit-to-refusal times on the replica that did not serve the warming request."""
    seen: list[float] = []
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=5) as http:

        def active(port: int, token: str) -> bool:
            url = f"http://127.0.0.1:{port}/v1/introspect"
            return bool(http.post(url, data={"token": token}, headers=auth).json()["active"])

        for member in members:
            token_id, token = member.pats[0], member.pat_texts[0]
            for port in ports:  # both caches hold it
                for _ in range(3):
                    if not active(port, token):
                        raise common.BenchError("a fresh token answered inactive")
            with db.transaction(run.engine()) as session:
                revoke_token(
                    session,
                    token_id=token_id,
                    reason="deleted",
                    source="bench",
                    now=datetime.now(UTC),
                )
            committed = time.perf_counter()
            while active(ports[1], token):
                if time.perf_counter() - committed > 5:
                    raise common.BenchError("a revocation was not seen within 5 s")
            seen.append(1000 * (time.perf_counter() - committed))
    return seen


def options(argv: list[str] | None) -> argparse.Namespace:
    parsed = common.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    parsed.add_argument("--requests", type=int, default=None, help="per saturation run (20000)")
    parsed.add_argument("--revocations", type=int, default=None, help="per run (100)")
    parsed.add_argument("--connections", type=int, default=32)
    parsed.add_argument("--log-level", default="warning", help="the servers' log level")
    args = common.parse(parsed, argv)
    args.requests = args.requests or common.pick(args, 20000, 500)
    args.revocations = args.revocations or common.pick(args, 100, 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    rates: list[float] = []
    bases: list[float] = []
    p99s: list[float] = []
    visible: list[float] = []
    try:
        with common.bench(NAME, args) as run:
            postgres = run.engine().dialect.name == "postgresql"
            members = common.populate(
                run.engine(),
                users=TOKENS + args.revocations * args.runs,
                pats=1,
                aats=0,
                texts=True,
            )
            texts = [m.pat_texts[0] for m in members[:TOKENS]]
            logs = run.home / "logs"
            env = run.child_env(TOKENWARDEN_INTROSPECTION_KEYS=KEY)
            ports = [free_port(), free_port()]
            empty_port = free_port()
            children = [
                common.Child(
                    f"API {n}",
                    common.tokenwarden("api", "--port", str(port), "--log-level", args.log_level),
                    env,
                    logs / f"api-{n}.log",
                )
                for n, port in enumerate(ports if postgres else ports[:1])
            ]
            empty = common.Child(
                "empty API",
                common.python(
                    "-m",
                    "bench._empty_api",
                    "--port",
                    str(empty_port),
                    "--log-level",
                    args.log_level,
                ),
                env,
                logs / "empty-api.log",
            )
            for child in [*children, empty]:
                child.start()
            try:
                for child, port in zip(
                    [*children, empty], [*ports[: len(children)], empty_port], strict=True
                ):
                    common.wait_for_http(f"http://127.0.0.1:{port}/healthz", child)
                saturate(ports[0], texts, 2000, args.connections)  # warm: caches, pools
                saturate(empty_port, texts, 2000, args.connections)
                for number in range(args.runs):
                    base = saturate(empty_port, texts, args.requests, args.connections)
                    ours = saturate(ports[0], texts, args.requests, args.connections)
                    p99 = paced_p99_ms(ports[0], texts, ours / 2, common.pick(args, 5, 1))
                    bases.append(base)
                    rates.append(ours)
                    p99s.append(p99)
                    line = (
                        f"  run {number + 1}: empty {base:,.0f}/s, ours {ours:,.0f}/s, "
                        f"p99 at half {p99:.2f} ms"
                    )
                    if postgres:
                        batch = members[TOKENS + number * args.revocations :][: args.revocations]
                        seen = visibility_ms(run, ports, batch)
                        visible.append(common.percentile(seen, 0.99))
                        line += (
                            f", revocation seen p99 {visible[-1]:.1f} ms "
                            f"(p50 {common.median(seen):.1f})"
                        )
                    print(line, file=sys.stderr, flush=True)
            finally:
                for child in [*children, empty]:
                    child.stop()
    except (common.BenchError, OSError) as error:
        return common.failed(NAME, error, unit=UNIT, target=RATIO_TARGET)
    ratios = [common.ratio(v, b) for v, b in zip(rates, bases, strict=True)]
    ratio, p99 = common.median(ratios), common.median(p99s)
    seen_p99 = common.median(visible) if visible else None
    print(
        f"POST /v1/introspect over {args.connections} connections, {TOKENS} active tokens, "
        f"{args.runs} run(s)"
    )
    rows: list[list[Any]] = [
        [
            "introspections/s",
            common.median(rates),
            common.median(bases),
            ratio,
            f">= {RATIO_TARGET}",
        ],
        ["p99 ms at half rate", p99, None, None, f"<= {P99_TARGET_MS}"],
        ["revocation seen p99 ms", seen_p99, None, None, f"<= {VISIBLE_TARGET_MS}"],
    ]
    print(common.table(["measure", "ours", "empty endpoint", "ratio", "target"], rows))
    if seen_p99 is None:
        print(
            "revocation visibility: skipped (needs a Postgres --database-url; "
            "SQLite is one machine)"
        )
    ok = (
        ratio >= RATIO_TARGET
        and p99 <= P99_TARGET_MS
        and (seen_p99 is None or seen_p99 <= VISIBLE_TARGET_MS)
    )
    outcome = common.result(
        NAME,
        value=common.median(rates),
        baseline=common.median(bases),
        ratio=ratio,
        target={
            "ratio": RATIO_TARGET,
            "p99_ms": P99_TARGET_MS,
            "revocation_seen_p99_ms": VISIBLE_TARGET_MS,
        },
        ok=ok,
        unit=UNIT,
        p99_ms=common.rounded(p99, 2),
        revocation_seen_p99_ms=common.rounded(seen_p99, 1) if seen_p99 is not None else None,
        runs=args.runs,
        short=args.short,
    )
    return common.finish(outcome, short=args.short)


if __name__ == "__main__":
    sys.exit(main())
