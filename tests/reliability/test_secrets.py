"""Secrets, after the whole suite: no raw token anywhere; no way in without credentials.

This module runs last (see conftest). The first test searches everything the suite left
behind, the logs of every process, a dump of every database, every message seen waiting on a
queue, for any token: by the token pattern, and by the text (and the random body alone) of
every token the suite issued or reported. Run on its own, it first makes a small workload of
its own so that there is something to search.

The others: every endpoint that takes credentials refuses each request without them or with
forged ones (and stores nothing), and the leak endpoints answer alike, in about the same time,
whether the reported token exists or not.
"""

from __future__ import annotations

import base64
import json
import re
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tests.reliability.apikeys import (
    GITHUB_PATH,
    GITLAB_SECRET,
    IDENTIFIER_HEADER,
    PRODUCER_KEY,
    SIGNATURE_HEADER,
    GitHubSigner,
)
from tests.reliability.evidence import Evidence
from tests.reliability.figures import Figures
from tests.reliability.harness import ChaosStack, chaos_stack
from tests.reliability.workload import cloud_event
from tokenwarden.worker.domain.models import InboxEvent, TokenKind
from tokenwarden.worker.domain.removals import remove_member
from tokenwarden.worker.domain.revocation import revoke_token
from tokenwarden.worker.domain.tokens import TOKEN_PATTERN, generate

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

PUBLIC = {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/redoc"}
LEAK_ROUNDS = 60
# Medians of the two groups may differ by this much before the difference counts as a tell.
TIMING_SLACK_S = 0.004
TIMING_SLACK_RATIO = 0.35
BODY = 32  # the random part of a token, after sm_pat_ / sm_aat_
ALNUM_RUN = re.compile(rb"[0-9A-Za-z]{32,}")


def _small_workload(tmp_path: Path, evidence: Evidence) -> None:
    """Something to search when this module runs alone: tokens, leaks, a poison message."""
    with chaos_stack(
        tmp_path / "alone", evidence=evidence, label="secrets-alone", roles=("api", "worker")
    ) as stack:
        stack.member("o-alone", "u-alone")
        issued = [stack.token(TokenKind.PERSONAL, "o-alone", "u-alone") for _ in range(3)]
        texts = [i.token for i in issued] + [generate(TokenKind.APPLICATION)]
        evidence.add_tokens(texts)
        stack.send(
            *[
                cloud_event(
                    f"alone-{n}",
                    "token.leak_suspected",
                    {"token": text, "source_url": f"https://x.example/{text}"},
                    datetime.now(UTC),
                )
                for n, text in enumerate(texts)
            ]
        )
        stack.publish_raw(f"not json {texts[0]}")
        stack.wait_settled(len(texts), timeout=60)


def test_no_raw_token_in_any_log_dump_or_queued_message(tmp_path: Path, evidence: Evidence) -> None:
    if not evidence.tokens:
        _small_workload(tmp_path, evidence)
    figures = Figures("secrets_after_suite")
    # A token's text holds its random body; a body found anywhere, with or without the prefix,
    # is a token found. Bodies are looked up among every run of 32 or more letters and digits.
    bodies = {token[7:39].encode(): token for token in evidence.tokens}
    shape = re.compile(TOKEN_PATTERN.pattern.encode())
    scanned: Counter[str] = Counter()
    size = 0
    by_pattern: list[str] = []
    by_text: list[str] = []
    for path in evidence.files():
        kind = path.parent.name
        if path.name == "figures.jsonl":
            continue
        data = path.read_bytes()
        scanned[kind] += 1
        size += len(data)
        by_pattern += [
            f"{kind}/{path.name}: {match.group()[:10].decode()}…" for match in shape.finditer(data)
        ]
        for run in ALNUM_RUN.finditer(data):
            text = run.group()
            for start in range(len(text) - BODY + 1):
                found = bodies.get(text[start : start + BODY])
                if found is not None:
                    by_text.append(f"{kind}/{path.name}: the body of {found[:10]}…")
    figures.set(
        files=dict(scanned),
        megabytes=round(size / 1e6, 1),
        tokens_searched=len(bodies),
        found_by_pattern=len(by_pattern),
        found_by_text=len(by_text),
    )
    figures.publish(evidence.root)
    assert scanned["logs"], dict(scanned)
    assert scanned["database"], dict(scanned)
    assert not by_pattern, by_pattern[:10]
    assert not by_text, by_text[:10]


def _protected(stack: ChaosStack) -> list[tuple[str, str]]:
    document = httpx.get(f"{stack.api_url}/openapi.json", timeout=30).json()
    operations = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            headers = {
                p["name"] for p in operation.get("parameters", []) if p.get("in") == "header"
            }
            # A Shared Signals SET carries its credential, its signature, in the body.
            signed_body = "application/secevent+jwt" in operation.get("requestBody", {}).get(
                "content", {}
            )
            guarded = bool(operation.get("security")) or IDENTIFIER_HEADER in headers
            guarded |= signed_body
            if guarded:
                operations.append((method.upper(), path))
            else:
                assert path in PUBLIC, f"{method.upper()} {path} takes no credentials"
    return operations


def _forgeries(signer: GitHubSigner, body: bytes) -> dict[str, dict[str, str]]:
    wrong = "twp_" + "A" * 43
    return {
        "none": {},
        "bearer without a key": {"Authorization": "Bearer"},
        "wrong bearer": {"Authorization": f"Bearer {wrong}"},
        "key one character short": {"Authorization": f"Bearer {PRODUCER_KEY[:-1]}"},
        "key with a suffix": {"Authorization": f"Bearer {PRODUCER_KEY}x"},
        "gitlab secret as producer key": {"Authorization": f"Bearer {GITLAB_SECRET}x"},
        "basic auth": {
            "Authorization": "Basic " + base64.b64encode(f"x:{PRODUCER_KEY}x".encode()).decode()
        },
        "key in another header": {"X-Api-Key": PRODUCER_KEY + "x"},
        "producer key as a gateway key": {"X-Tokenwarden-Key": PRODUCER_KEY},
        "wrong gateway key": {"X-Tokenwarden-Key": wrong},
        "unknown key id": {IDENTIFIER_HEADER: "nope", SIGNATURE_HEADER: signer.sign(body)},
        "signed by another key": {
            IDENTIFIER_HEADER: signer.identifier,
            SIGNATURE_HEADER: signer.sign(body, stranger=True),
        },
        "signature of another body": {
            IDENTIFIER_HEADER: signer.identifier,
            SIGNATURE_HEADER: signer.sign(body + b" "),
        },
        "signature not base64": {IDENTIFIER_HEADER: signer.identifier, SIGNATURE_HEADER: "!!"},
        "signature without key id": {SIGNATURE_HEADER: signer.sign(body)},
    }


@pytest.mark.timeout(180)
def test_every_guarded_endpoint_refuses_missing_or_forged_credentials(
    tmp_path: Path, evidence: Evidence
) -> None:
    figures = Figures("forged_requests")
    with (
        GitHubSigner() as signer,
        chaos_stack(
            tmp_path / "home",
            evidence=evidence,
            label="forged",
            roles=("api",),
            env={
                "TOKENWARDEN_GITHUB_KEYS_URL": signer.keys_url,
                "TOKENWARDEN_GITLAB_REVOCATION_TOKEN": GITLAB_SECRET,
            },
        ) as stack,
        httpx.Client(base_url=stack.api_url, timeout=30) as client,
    ):
        leaked = generate(TokenKind.PERSONAL)
        evidence.add_tokens([leaked])
        bodies: dict[str, bytes] = {
            "/v1/events": json.dumps(
                cloud_event(
                    "forged-1", "token.leak_suspected", {"token": leaked}, datetime.now(UTC)
                )
            ).encode(),
            GITHUB_PATH: json.dumps(
                [{"token": leaked, "type": "tokenwarden_personal_access_token", "url": "https://x"}]
            ).encode(),
            "/v1/revoke_tokens": json.dumps(
                [{"type": "gitleaks_rule_id_tokenwarden_personal_access_token", "token": leaked}]
            ).encode(),
        }
        operations = _protected(stack)
        outcomes: Counter[str] = Counter()
        accepted: list[str] = []
        for method, path in operations:
            body = bodies.get(path, b"") if method == "POST" else None
            for name, headers in _forgeries(signer, body or b"").items():
                sent = {"Content-Type": "application/json", **headers}
                response = client.request(method, path, content=body, headers=sent)
                outcomes[str(response.status_code)] += 1
                if response.status_code < 400 or response.status_code >= 500:
                    accepted.append(f"{method} {path} with {name}: {response.status_code}")
                if leaked in response.text:
                    accepted.append(f"{method} {path} with {name}: echoed the token")
        with stack.session() as session:
            stored = session.scalar(select(func.count()).select_from(InboxEvent))
        refused = sum(outcomes.values()) - len(accepted)
        figures.set(
            guarded_operations=len(operations),
            requests=sum(outcomes.values()),
            refused=refused,
            refused_percent=round(100 * refused / max(1, sum(outcomes.values())), 1),
            statuses=dict(outcomes),
            events_stored=stored,
        )
        figures.publish(evidence.root)
        assert {path for _, path in operations} >= {"/v1/events"}
        assert not accepted, accepted
        assert stored == 0


def _timed(call: Callable[[str], httpx.Response], token: str) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = call(token)
    return time.perf_counter() - started, response


def _shape(response: httpx.Response) -> str:
    """The answer with what differs per request (ids) taken out."""
    if not response.content:
        return f"{response.status_code} <empty>"
    try:
        body: Any = response.json()
    except ValueError:
        return f"{response.status_code} {response.text[:100]}"
    if isinstance(body, dict) and "accepted" in body:
        body = {"accepted": len(body["accepted"])}
    if isinstance(body, list):
        body = [
            {k: v for k, v in item.items() if k not in ("token_hash", "label")} for item in body
        ]
    return f"{response.status_code} {json.dumps(body, sort_keys=True)}"


@pytest.mark.timeout(240)
def test_leak_endpoints_answer_alike_whether_the_token_exists_or_not(
    tmp_path: Path, evidence: Evidence
) -> None:
    figures = Figures("leak_answers_and_timings")
    with (
        GitHubSigner() as signer,
        chaos_stack(
            tmp_path / "home",
            evidence=evidence,
            label="leak-timing",
            roles=("api",),
            env={
                "TOKENWARDEN_GITHUB_KEYS_URL": signer.keys_url,
                "TOKENWARDEN_GITLAB_REVOCATION_TOKEN": GITLAB_SECRET,
                # Far more requests than a reporter sends: the rate limit is tried elsewhere.
                "TOKENWARDEN_LEAK_RATE_PER_MINUTE": "1000000",
                "TOKENWARDEN_LEAK_RATE_BURST": "1000000",
            },
        ) as stack,
        httpx.Client(base_url=stack.api_url, timeout=30) as client,
    ):
        stack.member("o-timing", "u-timing")
        known = [stack.token(TokenKind.PERSONAL, "o-timing", "u-timing").token for _ in range(8)]
        unknown = [generate(TokenKind.PERSONAL) for _ in range(8)]
        evidence.add_tokens(known + unknown)

        def events(token: str) -> httpx.Response:
            event = cloud_event(
                f"t-{uuid.uuid4().hex}", "token.leak_suspected", {"token": token}, datetime.now(UTC)
            )
            return client.post(
                "/v1/events",
                json=event,
                headers={"Authorization": f"Bearer {PRODUCER_KEY}"},
            )

        def github(token: str) -> httpx.Response:
            body = json.dumps(
                [{"token": token, "type": "tokenwarden_personal_access_token", "url": "https://x"}]
            ).encode()
            return client.post(
                GITHUB_PATH,
                content=body,
                headers={"Content-Type": "application/json", **signer.headers(body)},
            )

        def gitlab(token: str) -> httpx.Response:
            return client.post(
                "/v1/revoke_tokens",
                json=[
                    {"type": "gitleaks_rule_id_tokenwarden_personal_access_token", "token": token}
                ],
                headers={"Authorization": f"Bearer {GITLAB_SECRET}"},
            )

        endpoints: dict[str, Callable[[str], httpx.Response]] = {
            "events": events,
            "github": github,
            "gitlab": gitlab,
        }
        document = httpx.get(f"{stack.api_url}/openapi.json", timeout=30).json()["paths"]
        endpoints = {
            name: call
            for name, call in endpoints.items()
            if {"events": "/v1/events", "github": GITHUB_PATH, "gitlab": "/v1/revoke_tokens"}[name]
            in document
        }
        results: dict[str, Any] = {}
        tells: list[str] = []
        for name, call in endpoints.items():
            for token in known[:2] + unknown[:2]:  # warm-up: connections, caches, first fetch
                call(token)
            times: dict[bool, list[float]] = {True: [], False: []}
            shapes: dict[bool, set[str]] = {True: set(), False: set()}
            for number in range(LEAK_ROUNDS):
                for exists in (number % 2 == 0, number % 2 == 1):
                    token = (known if exists else unknown)[number % len(known)]
                    seconds, response = _timed(call, token)
                    times[exists].append(seconds)
                    shapes[exists].add(_shape(response))
            known_median = statistics.median(times[True])
            unknown_median = statistics.median(times[False])
            slack = max(TIMING_SLACK_S, TIMING_SLACK_RATIO * min(known_median, unknown_median))
            results[name] = {
                "known_ms": round(known_median * 1000, 2),
                "unknown_ms": round(unknown_median * 1000, 2),
                "answers_known": sorted(shapes[True]),
                "answers_unknown": sorted(shapes[False]),
            }
            if shapes[True] != shapes[False]:
                tells.append(f"{name}: answers differ {shapes[True]} vs {shapes[False]}")
            if abs(known_median - unknown_median) > slack:
                tells.append(
                    f"{name}: medians {known_median * 1000:.2f} ms (known) vs "
                    f"{unknown_median * 1000:.2f} ms (unknown)"
                )
        figures.set(
            rounds_per_group=LEAK_ROUNDS,
            endpoints=sorted(endpoints),
            **{f"{name}_ms": f"{r['known_ms']}/{r['unknown_ms']}" for name, r in results.items()},
            tells=len(tells),
        )
        figures.publish(evidence.root)
        assert "events" in endpoints
        assert not tells, tells


def test_introspection_refuses_alike_whatever_the_reason(
    tmp_path: Path, evidence: Evidence
) -> None:
    """RFC 7662 §2.2: a revoked token, a leaver's and an unknown one answer the same body in
    about the same time, so a caller cannot tell which it holds."""
    key = "twi_" + "k" * 40
    figures = Figures("introspection_refusal_timings")
    with (
        chaos_stack(
            tmp_path / "home",
            evidence=evidence,
            label="introspect-timing",
            roles=("api",),
            env={"TOKENWARDEN_INTROSPECTION_KEYS": key},
        ) as stack,
        httpx.Client(base_url=stack.api_url, timeout=30) as client,
    ):
        stack.member("o-intro", "u-stays")
        stack.member("o-intro", "u-leaves")
        revoked = [stack.token(TokenKind.PERSONAL, "o-intro", "u-stays") for _ in range(8)]
        leavers = [stack.token(TokenKind.PERSONAL, "o-intro", "u-leaves") for _ in range(8)]
        now = datetime.now(UTC)
        with stack.session() as session:
            for issued in revoked:
                revoke_token(session, token_id=issued.id, reason="test", source="test", now=now)
            remove_member(
                session,
                org_id="o-intro",
                user_id="u-leaves",
                at=now,
                now=now,
                source="test",
                event_id=None,
            )
        groups = {
            "revoked": [issued.token for issued in revoked],
            "not_member": [issued.token for issued in leavers],
            "unknown": [generate(TokenKind.PERSONAL) for _ in range(8)],
        }
        evidence.add_tokens([text for texts in groups.values() for text in texts])

        def ask(token: str) -> httpx.Response:
            return client.post(
                "/v1/introspect", data={"token": token}, headers={"Authorization": f"Bearer {key}"}
            )

        for texts in groups.values():  # warm-up: connections, the refusal limiter's first rows
            for text in texts:
                ask(text)
        times: dict[str, list[float]] = {name: [] for name in groups}
        bodies: dict[str, set[bytes]] = {name: set() for name in groups}
        for number in range(LEAK_ROUNDS):
            for name, texts in groups.items():
                seconds, response = _timed(ask, texts[number % len(texts)])
                times[name].append(seconds)
                bodies[name].add(response.content)
        medians = {name: statistics.median(values) for name, values in times.items()}
        figures.set(
            rounds_per_group=LEAK_ROUNDS,
            **{f"{name}_ms": round(m * 1000, 2) for name, m in medians.items()},
            bodies=sorted({body.decode() for found in bodies.values() for body in found}),
        )
        figures.publish(evidence.root)
    assert all(found == {b'{"active":false}'} for found in bodies.values()), bodies
    fastest = min(medians.values())
    slack = max(TIMING_SLACK_S, TIMING_SLACK_RATIO * fastest)
    assert max(medians.values()) - fastest <= slack, medians
