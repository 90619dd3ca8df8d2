"""Events/s accepted by the producer API over HTTP, beside an empty endpoint on the same server.

``tokenwarden api --workers 2`` (two processes on one port: one a core on the 2-core
machine the README's figures come from; ``--api-workers``) takes ``membership.removed``
events, in batches of 100 and one per request, from 32 keep-alive client connections; every
answer must be a ``202``, and every event must be in the inbox at the end. A rate accepted
is a capacity, so the load saturates both servers: the empty endpoint's rate is flat from 16
connections up, while with only a few, each connection waits out a durable commit between
requests and the figure is that round trip, which ``latency.py`` measures instead.

The limit of single events is ``bench/_empty_api.py``: a FastAPI ``POST /v1/events`` that
only reads the body, served with the same uvicorn options and process count, sent the very
same requests. No worker runs, so the queue only fills (it is deleted at the end). The ratio
is the median of the per-run ratios (each run measures ours and its limit, one right after
the other); ``ok`` needs both batch and single to hold.

The limit of batches is what Postgres alone can put into the inbox table, measured in each
run: rows from ``generate_series`` inserted by the server itself, no client work at all
(rolled back). Every accepted event must be an inbox row before its ``202``, so an empty
endpoint, which never makes an event durable, is out of reach by half for any such design:
its batch rate is shown for context. On SQLite the empty endpoint stays the limit of both.

Beside each of our figures, the API's CPU time per event and the cores it used, summed over
all its processes (the supervisor and the processes it started, from ``/proc``): a
Python process runs on one core at a time, so a share near the number of processes means the
API's own work per event, not the database, bounds the rate.

    .venv/bin/python bench/ingest.py [--runs 3] [--batches 300] [--singles 3000]
        [--api-workers 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Engine, func, select, text

from bench import common
from tokenwarden.worker.domain.models import InboxEvent
from tokenwarden.worker.ops.supervisor import free_port

NAME: Final = "ingest"
TARGET: Final = 0.5
UNIT: Final = "events/s"
BATCH: Final = 100
# What uvicorn logs (at level info) when one process's app is started.
STARTED: Final = "Application startup complete."
MODES: Final = ("batch", "single")


@dataclass
class Mode:
    name: str
    values: list[float] = field(default_factory=list)
    baselines: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    # The empty endpoint's rate, and ours over it: context where it is not the baseline.
    empties: list[float] = field(default_factory=list)
    empty_ratios: list[float] = field(default_factory=list)
    # The API's CPU time per event (µs), all its processes together, and the cores they used
    # (1.0 is one core): one Python process runs on one core at a time.
    cpu_us: list[float] = field(default_factory=list)
    core_shares: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return common.median(self.ratios)

    def summary(self) -> dict[str, Any]:
        return {
            "value": common.rounded(common.median(self.values), 1),
            "baseline": common.rounded(common.median(self.baselines), 1),
            "ratio": common.rounded(self.ratio),
            "empty_endpoint": common.rounded(common.median(self.empties), 1),
            "empty_endpoint_ratio": common.rounded(common.median(self.empty_ratios)),
            "api_cpu_us_per_event": common.rounded(common.median(self.cpu_us), 1),
            "api_cores": common.rounded(common.median(self.core_shares), 2),
            "ok": self.ratio >= TARGET,
        }


def event(event_id: str, index: int, at: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "bench://ingest",
        "type": "membership.removed",
        "time": at,
        "data": {"org_id": f"org-{index % 100}", "user_id": f"u-{index:07d}"},
    }


def requests(port: int, mode: str, count: int, tag: str) -> list[bytes]:
    """``count`` requests of fresh events (a reused id would be a resend, not new work)."""
    at = datetime.now(UTC).isoformat()
    size = BATCH if mode == "batch" else 1
    built = []
    for number in range(count):
        events = [
            event(f"evt-{tag}-{number:06d}-{i:03d}", number * size + i, at) for i in range(size)
        ]
        body = json.dumps(events if mode == "batch" else events[0]).encode()
        built.append(common.http_request(port, "/v1/events", body))
    return built


def drive(
    port: int, sent: list[bytes], *, connections: int, per_request: int, pid: int | None = None
) -> tuple[float, float, float]:
    """Events/s, the median request latency (ms) and the CPU seconds process ``pid`` and its
    descendants used meanwhile (0 without one); every answer must be a 202."""
    before = cpu_seconds(pid)
    load = common.http_load(port, sent, connections=connections)
    used = cpu_seconds(pid) - before
    if set(load.statuses) != {202}:
        detail = load.bodies[0][:300] if load.bodies else b""
        raise common.BenchError(f"answers other than 202: {load.statuses} {detail!r}")
    rate = load.requests * per_request / load.seconds
    return rate, 1000 * common.median(load.latencies), used


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU time of process ``pid`` and its living descendants so far (0
    without one, or off Linux): the API's supervisor and the processes serving for it."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in children(pid))


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that are still there (Linux)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def wait_for_processes(child: common.Child, count: int, timeout_s: float = 60.0) -> None:
    """Wait until ``count`` processes of ``child`` have said their app is started (uvicorn
    says so at level info): the port answers as soon as the first has, and a load sent
    before the others would be served by fewer."""
    deadline = time.monotonic() + timeout_s
    while child.tail(10**6).count(STARTED) < count:
        child.check_alive()
        if time.monotonic() > deadline:
            raise common.BenchError(
                f"fewer than {count} processes of the {child.name} started in {timeout_s:.0f} "
                f"s:\n{child.tail()}"
            )
        time.sleep(0.1)


# The inbox rows Postgres writes by itself: the ingest batch figure's physical ceiling.
_CEILING_INSERT: Final = (
    "INSERT INTO events (id, type, source, time, data, digest, status, attempts, "
    "received_at, published_at) "
    "SELECT 'evt-ceiling-' || lpad(i::text, 7, '0'), 'membership.removed', 'bench://ingest', "
    "now(), json_build_object('org_id', 'org-' || (i % 100), 'user_id', 'u-' || i), "
    "encode(sha256(i::text::bytea), 'hex'), 'pending', 0, now(), now() "
    "FROM generate_series(1, :rows) AS i"
)


def inbox_ceiling(engine: Engine, rows: int) -> float | None:
    """Rows/s Postgres inserts into the inbox table with no client work (None elsewhere)."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as connection, connection.begin() as transaction:
        started = time.perf_counter()
        connection.execute(text(_CEILING_INSERT), {"rows": rows})
        seconds = time.perf_counter() - started
        transaction.rollback()
    return rows / seconds


def options(argv: list[str] | None) -> argparse.Namespace:
    parsed = common.parser(__doc__.splitlines()[0] if __doc__ else NAME)
    parsed.add_argument("--batches", type=int, default=None, help="batch requests per run (300)")
    parsed.add_argument("--singles", type=int, default=None, help="single requests per run (3000)")
    parsed.add_argument("--connections", type=int, default=32, help="client connections (32)")
    parsed.add_argument(
        "--log-level", default="info", help="both servers' log level (info or debug)"
    )
    parsed.add_argument(
        "--api-workers",
        type=int,
        default=2,
        help="processes of both servers, one a core on a 2-core machine (2)",
    )
    args = common.parse(parsed, argv)
    if args.api_workers < 1:
        parsed.error("--api-workers must be at least 1")
    if args.log_level.lower() not in {"info", "debug"}:
        parsed.error("--log-level: info or debug (the bench waits for each process to say so)")
    args.batches = args.batches or common.pick(args, 300, 10)
    args.singles = args.singles or common.pick(args, 3000, 100)
    return args


def limits(modes: dict[str, Mode], number: int, ceiling: float | None) -> None:
    """Run ``number``'s baselines: for batches, the inbox rows Postgres writes alone in the
    same run (an empty endpoint never makes an event durable, so half of its rate is out of
    reach of any design that commits before the ``202``); for single events, the empty
    endpoint. On SQLite, which has no such ceiling here, the empty endpoint for both."""
    for mode in modes.values():
        empty = mode.empties[number]
        limit = ceiling if mode.name == "batch" and ceiling is not None else empty
        mode.baselines.append(limit)
        mode.ratios.append(common.ratio(mode.values[number], limit))


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    modes = {name: Mode(name) for name in MODES}
    counts = {"batch": args.batches, "single": args.singles}
    sizes = {"batch": BATCH, "single": 1}
    ceilings: list[float] = []
    try:
        with common.bench(NAME, args) as run:
            ours_port, empty_port = free_port(), free_port()
            logs = run.home / "logs"
            workers = str(args.api_workers)
            ours = common.Child(
                "API",
                common.tokenwarden(
                    "api",
                    "--port",
                    str(ours_port),
                    "--log-level",
                    args.log_level,
                    "--workers",
                    workers,
                ),
                run.child_env(),
                logs / "api.log",
            )
            empty = common.Child(
                "empty API",
                common.python(
                    "-m",
                    "bench._empty_api",
                    "--port",
                    str(empty_port),
                    "--log-level",
                    args.log_level,
                    "--workers",
                    workers,
                ),
                run.child_env(),
                logs / "empty-api.log",
            )
            with ours, empty:
                common.wait_for_http(f"http://127.0.0.1:{ours_port}/healthz", ours)
                common.wait_for_http(f"http://127.0.0.1:{empty_port}/healthz", empty)
                wait_for_processes(ours, args.api_workers)
                wait_for_processes(empty, args.api_workers)
                sent = 0
                for mode in MODES:  # warm both: connections, pools, caches
                    for port in (empty_port, ours_port):
                        warm = requests(port, mode, 20, f"warm-{mode}-{port}")
                        drive(port, warm, connections=args.connections, per_request=1)
                    sent += 20 * sizes[mode]
                for number in range(args.runs):
                    for mode in MODES:
                        tag = f"{mode}-{number}"
                        count, size = counts[mode], sizes[mode]
                        base, _, _ = drive(
                            empty_port,
                            requests(empty_port, mode, count, f"empty-{tag}"),
                            connections=args.connections,
                            per_request=size,
                        )
                        started = time.perf_counter()
                        value, p50, cpu = drive(
                            ours_port,
                            requests(ours_port, mode, count, tag),
                            connections=args.connections,
                            per_request=size,
                            pid=ours.pid,
                        )
                        wall = time.perf_counter() - started
                        sent += count * size
                        measured = modes[mode]
                        measured.values.append(value)
                        measured.empties.append(base)
                        measured.empty_ratios.append(common.ratio(value, base))
                        measured.p50_ms.append(p50)
                        measured.cpu_us.append(1e6 * cpu / (count * size))
                        measured.core_shares.append(cpu / wall)
                        print(
                            f"  run {number + 1} {mode}: empty {base:,.0f}, ours {value:,.0f} "
                            f"events/s, ratio {value / base:.3f}, ours p50 {p50:.1f} ms, API "
                            f"{1e6 * cpu / (count * size):.1f} µs CPU an event, "
                            f"{cpu / wall:.2f} cores",
                            file=sys.stderr,
                            flush=True,
                        )
                    ceiling = inbox_ceiling(run.engine(), common.pick(args, 200_000, 2_000))
                    limits(modes, number, ceiling)
                    if ceiling is not None:
                        ceilings.append(ceiling)
                        print(
                            f"  run {number + 1}: Postgres alone inserts {ceiling:,.0f} "
                            "inbox rows/s",
                            file=sys.stderr,
                            flush=True,
                        )
            with run.engine().connect() as connection:
                stored = connection.scalar(select(func.count()).select_from(InboxEvent))
            if stored != sent:
                raise common.BenchError(f"{stored} events in the inbox, {sent} accepted")
    except (common.BenchError, OSError) as error:
        return common.failed(NAME, error, unit=UNIT, target=TARGET)
    print(
        f"membership.removed events over HTTP, {args.connections} connections, {args.runs} "
        f"run(s): {args.batches} batches of {BATCH} and {args.singles} single events per run"
    )
    rows: list[list[Any]] = [
        [
            m.name,
            common.median(m.values),
            common.median(m.baselines),
            m.ratio,
            min(m.ratios),
            common.median(m.empties),
            common.median(m.empty_ratios),
            common.median(m.p50_ms),
            common.median(m.cpu_us),
            common.median(m.core_shares),
        ]
        for m in modes.values()
    ]
    print(
        common.table(
            [
                "mode",
                "events/s",
                "limit",
                "ratio",
                "min ratio",
                "empty endpoint",
                "its ratio",
                "ours p50 ms",
                "API µs CPU/event",
                "API cores",
            ],
            rows,
        )
    )
    print(
        "limit: for batches, the inbox rows Postgres inserts alone in the same run (the empty "
        "endpoint on SQLite); for single events, the empty endpoint"
    )
    ceiling = common.median(ceilings) if ceilings else None
    if ceiling is not None:
        print(
            f"Postgres alone inserts {ceiling:,.0f} inbox rows/s (no client work); the empty "
            f"endpoint takes {common.median(modes['batch'].empties):,.0f} events/s in batches"
        )
    batch, single = modes["batch"], modes["single"]
    cpu_us = common.median(batch.cpu_us)
    if cpu_us > 0:
        print(
            f"the API's {args.api_workers} process(es) spend {cpu_us:.1f} µs of CPU on a "
            f"batched event, together {common.median(batch.core_shares):.2f} cores: each core "
            f"they have takes at most {1e6 / cpu_us:,.0f} events/s"
        )
    outcome = common.result(
        NAME,
        value=common.median(batch.values),
        baseline=common.median(batch.baselines),
        ratio=batch.ratio,
        target=TARGET,
        ok=batch.ratio >= TARGET and single.ratio >= TARGET,
        unit=UNIT,
        mode="batch",
        batch=batch.summary(),
        single=single.summary(),
        inbox_rows_ceiling=common.rounded(ceiling, 0) if ceiling is not None else None,
        connections=args.connections,
        api_workers=args.api_workers,
        runs=args.runs,
        short=args.short,
    )
    return common.finish(outcome, short=args.short)


if __name__ == "__main__":
    sys.exit(main())
