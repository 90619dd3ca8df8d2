"""Schemathesis against the producer API's own OpenAPI document, on a live API.

Every operation the document lists gets requests generated from its schema, valid ones and
invalid ones (schemathesis' positive and negative modes), each sent twice: with the caller's
real credentials (producer key, admin key, GitLab secret, or a GitHub signature over the exact body)
and with whatever schemathesis made up for them. At least a thousand requests in all; not
one may be answered with a 5xx, and every answer must match the document: a status it
lists, its content type, its body schema, its headers.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from tests.reliability.apikeys import (
    ADMIN_KEY,
    AUTH_HEADERS,
    GITLAB_SECRET,
    GitHubSigner,
    credentials,
)
from tests.reliability.evidence import Evidence
from tests.reliability.figures import Figures
from tests.reliability.harness import chaos_stack

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

# A Shared Signals SET (POST /v1/ssf/events) is text: sent as schemathesis sends text/plain.
schemathesis.serializer.alias("application/secevent+jwt", "text/plain")

MINIMUM_REQUESTS = 1_000
# Examples per operation, generation mode and credentials; operations without inputs stop
# as soon as Hypothesis has seen every distinct request.
EXAMPLES = {
    "POST /v1/events": 300,
    "POST /v1/secret-scanning/github": 150,
    "POST /v1/revoke_tokens": 100,
}
OTHER_EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


def _body_bytes(case: Any) -> bytes | None:
    body = case.body
    if body is None and not case.operation.get_request_payload_content_types():
        return None
    if isinstance(body, bytes):
        return body
    if isinstance(body, str) and "json" not in (case.media_type or ""):
        return body.encode("utf-8", "surrogatepass")
    try:
        return json.dumps(body).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return None


def _failures(error: BaseException) -> list[str]:
    nested = getattr(error, "exceptions", None)
    if nested:
        return [name for inner in nested for name in _failures(inner)]
    return [type(error).__name__ + ": " + (getattr(error, "title", "") or str(error))[:120]]


@pytest.mark.timeout(400)
def test_generated_requests_get_no_server_error_and_match_the_schema(
    tmp_path: Path, evidence: Evidence
) -> None:
    figures = Figures("fuzz[embedded]")
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    problems: Counter[str] = Counter()
    examples: dict[str, str] = {}
    unsendable: Counter[str] = Counter()
    with (
        GitHubSigner() as signer,
        chaos_stack(
            tmp_path / "home",
            evidence=evidence,
            label="fuzz",
            roles=("api", "worker"),
            env={
                "TOKENWARDEN_GITHUB_KEYS_URL": signer.keys_url,
                "TOKENWARDEN_GITLAB_REVOCATION_TOKEN": GITLAB_SECRET,
                # Far more requests than a reporter sends: the rate limit is tried elsewhere.
                "TOKENWARDEN_LEAK_RATE_PER_MINUTE": "1000000",
                "TOKENWARDEN_LEAK_RATE_BURST": "1000000",
                "TOKENWARDEN_ADMIN_KEYS": f"fuzz:{ADMIN_KEY}",
            },
        ) as stack,
        httpx.Client(base_url=stack.api_url, timeout=30) as client,
    ):
        schema = schemathesis.openapi.from_url(f"{stack.api_url}/openapi.json")
        operations = []
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), (
                f"the API's own schema has an invalid operation: {result}"
            )
            operations.append(result.ok())
        labels = sorted(f"{op.method.upper()} {op.path}" for op in operations)

        def exercise(case: Any, label: str, authenticated: bool, mode: str) -> None:
            body = _body_bytes(case)
            headers = {k: str(v) for k, v in (case.headers or {}).items()}
            if authenticated:
                headers = {k: v for k, v in headers.items() if k.lower() not in AUTH_HEADERS}
                headers.update(credentials(case.path, body or b"", signer))
            if body is not None and case.media_type:
                headers.setdefault("Content-Type", case.media_type)
            try:
                response = client.request(
                    case.method,
                    case.formatted_path,
                    params=case.query or None,
                    headers=headers,
                    content=body,
                )
            except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError):
                unsendable[label] += 1  # not even HTTP (a header value with a newline, say)
                return
            except httpx.HTTPError as error:
                problems[f"{label}: no answer ({type(error).__name__})"] += 1
                return
            sent[label] += 1
            statuses[response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as error:
                for failure in _failures(error):
                    key = f"{label} [{mode}, {'auth' if authenticated else 'no auth'}] {failure}"
                    problems[key] += 1
                    examples.setdefault(
                        key, f"{response.status_code} {response.text[:200]!r} for {body!r:.200}"
                    )

        for operation in operations:
            label = f"{operation.method.upper()} {operation.path}"
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode)

                @settings(
                    max_examples=EXAMPLES.get(label, OTHER_EXAMPLES),
                    deadline=None,
                    database=None,
                    derandomize=False,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=strategy, authenticated=st.booleans())
                def run(case: Any, authenticated: bool) -> None:
                    exercise(case, label, authenticated, mode.value)  # noqa: B023 - used at once

                try:
                    run()
                except Unsatisfiable:
                    # No invalid request exists for an operation without inputs.
                    assert mode is GenerationMode.NEGATIVE, label

        total = sum(sent.values())
        server_errors = sum(count for status, count in statuses.items() if status >= 500)
        evidence.keep_text("fuzz", "problems", json.dumps(examples, indent=1))
        figures.set(
            requests=total,
            operations=len(labels),
            per_operation=dict(sent),
            statuses=dict(sorted(statuses.items())),
            server_errors=server_errors,
            not_sendable_over_http=sum(unsendable.values()),
            schema_violations=sum(problems.values()),
            github_key_fetches=signer.fetches,
        )
        figures.publish(evidence.root)
        assert total >= MINIMUM_REQUESTS, f"only {total} requests"
        assert set(sent) == set(labels), f"never exercised: {set(labels) - set(sent)}"
        assert server_errors == 0, dict(statuses)
        assert not problems, "\n".join(
            f"{count}x {key}\n    e.g. {examples.get(key, '')}"
            for key, count in problems.most_common(15)
        )
        time.sleep(0)  # the worker applies whatever valid events went through; not judged here
