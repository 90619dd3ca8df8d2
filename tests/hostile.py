"""Hostile clients of the producer API on raw sockets, and what to read off the API after.

Used by ``tests/test_edge.py`` and ``tests/reliability/test_hostile_edge.py``: clients that
send GitHub's headers with a megabyte of body, send headers or a body a byte at a time, or
hang up half way; the API process's memory, its metrics and the error lines of its log.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
import socket
import struct
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from tests.reliability.apikeys import GITHUB_PATH, IDENTIFIER_HEADER, SIGNATURE_HEADER
from tests.stack import KEY

MIB = 1024 * 1024
# Well-formed base64 of a DER signature that signs nothing we send.
BOGUS_SIGNATURE = "MEUCIQDfLvT8/zM8F1aB3cM0ZwyeWF1m5YR6IhcUIv1OKQYL0wIgBZ5lVXB3gHK+dT8="


def head(path: str, length: int, **headers: str) -> bytes:
    """A POST's request line and headers, announcing a body of ``length`` bytes."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def github_head(identifier: str, length: int = MIB) -> bytes:
    headers = {
        "Content-Type": "application/json",
        IDENTIFIER_HEADER: identifier,
        SIGNATURE_HEADER: BOGUS_SIGNATURE,
    }
    return head(GITHUB_PATH, length, **headers)


def events_head(length: int) -> bytes:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    return head("/v1/events", length, **headers)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def restart_peak_rss(pid: int) -> None:
    """Make ``VmHWM`` count from now (Linux: ``clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def send_report(port: int, identifier: str, statuses: Counter[str]) -> None:
    """GitHub's headers and a megabyte of body; count the status answered, or how it ended."""
    chunk = b" " * 65536
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(github_head(identifier))
        sent = 0
        while sent < MIB:
            writer.write(chunk[: MIB - sent])
            sent += len(chunk)
            await writer.drain()
    except ConnectionError:
        pass  # refused before the body was all sent: the answer is waiting to be read
    try:
        line = await asyncio.wait_for(reader.readline(), 30)
        statuses[line.split(b" ")[1].decode() if line else "closed"] += 1
    except ConnectionError:
        statuses["reset"] += 1  # closed on a body it did not read: a refusal all the same
    finally:
        writer.close()


async def slow_client(
    port: int, first: bytes, drip: bytes, *, every: float = 0.5, give_up: float = 30.0
) -> tuple[float, bytes]:
    """Send ``first``, then ``drip`` every ``every`` s, until the server hangs up.

    Returns when it did (seconds after connecting; infinity if not within ``give_up``) and
    what it answered.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    answer = b""
    try:
        if first:
            writer.write(first)
        while time.monotonic() - began < give_up:
            try:
                data = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                if drip:
                    writer.write(drip)
                    await writer.drain()
                continue
            if not data:
                return time.monotonic() - began, answer
            answer += data
    except ConnectionError:
        return time.monotonic() - began, answer
    finally:
        writer.close()
    return float("inf"), answer


def abort(sock: socket.socket) -> None:
    """Close with a reset, as a client that crashed or lost its network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def answered(metrics: str, path: str, status: str) -> float:
    """How many requests to ``path`` the API's metrics count under ``status``."""
    pattern = (
        rf'tokenwarden_api_requests_total\{{path="{re.escape(path)}",status="{status}"\}} (\S+)'
    )
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else 0.0


def error_lines(log: str) -> list[str]:
    """The log's lines at level error or above, and any traceback."""
    found = []
    for line in log.splitlines():
        if "Traceback" in line:
            found.append(line)
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("level") in ("error", "critical"):
            found.append(line)
    return found


def produce(
    api_url: str, prefix: str, every_s: float, ready: Any, stop: Any, results: Connection
) -> None:
    """Post one event every ``every_s`` until ``stop``; send back (status, seconds) of each.

    Runs in a process of its own, so that the attacking clients' work in the test process
    does not slow the producer down and pass for the API's latency.
    """
    answers: list[tuple[int, float]] = []
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=api_url, timeout=30, headers=headers) as client:
        number = 0
        while not stop.is_set():
            number += 1
            event = {
                "specversion": "1.0",
                "id": f"{prefix}-{number}",
                "source": "test://producer",
                "type": "membership.added",
                "data": {"org_id": prefix, "user_id": f"u{number}", "role": "user"},
            }
            began = time.monotonic()
            try:
                status = client.post("/v1/events", json=event).status_code
            except httpx.HTTPError:
                status = 0
            answers.append((status, time.monotonic() - began))
            ready.set()
            stop.wait(every_s)
    results.send(answers)


class Producer:
    """A producer posting events in a process of its own, timing each answer."""

    def __init__(self, api_url: str, prefix: str, *, every_s: float = 0.02) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready = context.Event()
        self._stop = context.Event()
        self._results, sending = context.Pipe(duplex=False)
        self._process = context.Process(
            target=produce,
            args=(api_url, prefix, every_s, self._ready, self._stop, sending),
            daemon=True,
        )
        self.answers: list[tuple[int, float]] = []

    def start(self) -> None:
        self._process.start()
        if not self._ready.wait(30):
            raise AssertionError("the producer sent nothing within 30 s")

    def stop(self) -> None:
        self._stop.set()
        if self._results.poll(60):
            self.answers = self._results.recv()
        self._process.join(timeout=30)

    def p99_ms(self) -> float:
        times = sorted(seconds for _, seconds in self.answers)
        return 1000 * times[min(len(times) - 1, int(len(times) * 0.99))] if times else 0.0

    def statuses(self) -> dict[int, int]:
        return dict(Counter(status for status, _ in self.answers))
