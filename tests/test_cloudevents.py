"""Both CloudEvents HTTP content modes, as the official SDK writes them, on ``POST /v1/events``.

Each mode's output revokes a leaver's PAT through a real API, worker and broker; the binding's
rule for telling the modes apart, and binary mode's refusals, are checked on the API alone.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from tests.stack import KEY, LIVE_STACKS, LiveStack, run_live
from tokenwarden.worker.domain.models import TokenKind

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(
    scope="module",
    params=LIVE_STACKS,
)
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    yield from run_live(request.param, tmp_path_factory.mktemp(f"ce-{request.param}"))


def removal(org: str, user: str, **attributes: Any) -> CloudEvent:
    return CloudEvent(
        attributes={
            "id": f"evt-{uuid.uuid4().hex[:12]}",
            "source": "hr://eventarc",
            "type": "membership.removed",
            "time": datetime.now(UTC),
            **attributes,
        },
        data={"org_id": org, "user_id": user},
    )


def leaver(live: LiveStack) -> tuple[str, str, str, str]:
    """A member with a PAT and an AAT: (org, user, the PAT's text, the AAT's text)."""
    suffix = uuid.uuid4().hex[:8]
    org, user = f"org-{suffix}", f"user-{suffix}"
    live.member(org, user)
    pat = live.token(TokenKind.PERSONAL, org, user)
    aat = live.token(TokenKind.APPLICATION, org, "deployer", created_by=user)
    return org, user, pat.token, aat.token


def post(live: LiveStack, message: ce_http.HTTPMessage) -> httpx.Response:
    return httpx.post(
        f"{live.api_url}/v1/events",
        content=message.body,
        headers={**message.headers, **AUTH},
        timeout=30,
    )


def assert_leaver_revoked(live: LiveStack, pat: str, aat: str) -> None:
    live.wait_for(
        lambda: live.verify(pat).reason == "revoked", timeout=15, message="the PAT revoked"
    )
    assert live.verify(aat).usable


pytestmark = pytest.mark.slow


def test_the_sdks_binary_mode_revokes_a_leavers_pat(live: LiveStack) -> None:
    org, user, pat, aat = leaver(live)
    event = removal(org, user)
    message = ce_http.to_binary_event(event)
    assert "ce-specversion" in message.headers
    assert "content-type" not in message.headers  # the SDK sends JSON data without one

    response = post(live, message)

    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": [event.get_id()]}
    assert_leaver_revoked(live, pat, aat)


def test_the_sdks_binary_mode_with_a_json_data_content_type_revokes_too(live: LiveStack) -> None:
    org, user, pat, aat = leaver(live)
    message = ce_http.to_binary_event(removal(org, user, datacontenttype="application/json"))
    assert message.headers["content-type"] == "application/json"

    assert post(live, message).status_code == 202
    assert_leaver_revoked(live, pat, aat)


def test_the_sdks_structured_mode_revokes_a_leavers_pat(live: LiveStack) -> None:
    org, user, pat, aat = leaver(live)
    message = ce_http.to_structured_event(removal(org, user))
    assert message.headers["content-type"].startswith("application/cloudevents+json")

    assert post(live, message).status_code == 202
    assert_leaver_revoked(live, pat, aat)


def test_a_batch_of_the_sdks_events_revokes_every_leaver(live: LiveStack) -> None:
    leavers = [leaver(live) for _ in range(3)]
    events = [removal(org, user) for org, user, _, _ in leavers]
    body = b"[" + b",".join(JSONFormat().write(event) for event in events) + b"]"

    response = httpx.post(
        f"{live.api_url}/v1/events",
        content=body,
        headers={"content-type": "application/cloudevents-batch+json", **AUTH},
        timeout=30,
    )

    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == [event.get_id() for event in events]
    for _, _, pat, aat in leavers:
        assert_leaver_revoked(live, pat, aat)


def test_the_same_event_in_either_mode_is_one_event(live: LiveStack) -> None:
    org, user, pat, _ = leaver(live)
    event = removal(org, user)
    assert post(live, ce_http.to_binary_event(event)).status_code == 202
    # Redelivered in the other mode: the same content under the same id, not a conflict.
    again = post(live, ce_http.to_structured_event(event))
    assert again.status_code == 202, again.text
    assert again.json() == {"accepted": [event.get_id()]}
    live.wait_for(lambda: live.verify(pat).reason == "revoked", message="the PAT revoked")


def test_a_plain_json_event_without_ce_headers_is_still_structured(live: LiveStack) -> None:
    org, user, pat, aat = leaver(live)
    event = json.loads(JSONFormat().write(removal(org, user)))
    response = httpx.post(f"{live.api_url}/v1/events", json=event, headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    assert_leaver_revoked(live, pat, aat)


def binary_headers(event_id: str, **more: str) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "hr://eventarc",
        "ce-type": "membership.removed",
        **AUTH,
        **more,
    }


@pytest.mark.parametrize(
    ("body", "extra", "status", "reason"),
    [
        (b"", {}, 422, "data"),
        (b"[{}]", {}, 422, "one JSON object"),
        (b'{"org_id": "a"}', {}, 422, "user_id"),
        (b"org_id=a", {"content-type": "text/plain"}, 415, "must be JSON"),
        (b'{"org_id": "a", "user_id": "b"}', {"ce-data": "x"}, 422, "not an attribute"),
        (b'{"org_id": "a", "user_id": "b"}', {"ce-specversion": "0.3"}, 422, "specversion"),
        (b'{"org_id": "a", "user_id": "b"}', {"ce-time": "tomorrow"}, 422, "time"),
        (b'{"org_id": "a", "user_id": "b"}', {"ce-source": "%FF%FE"}, 422, "percent-encoded"),
    ],
)
def test_a_binary_event_that_cannot_be_used_is_refused_and_not_stored(
    live: LiveStack, body: bytes, extra: dict[str, str], status: int, reason: str
) -> None:
    event_id = f"evt-{uuid.uuid4().hex[:12]}"
    response = httpx.post(
        f"{live.api_url}/v1/events",
        content=body,
        headers=binary_headers(event_id, **extra),
        timeout=30,
    )
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"] + json.dumps(response.json().get("errors"))
    assert live.events(event_id) == []


def test_a_binary_event_needs_the_producer_key(live: LiveStack) -> None:
    headers = binary_headers("evt-no-key")
    del headers["Authorization"]
    response = httpx.post(
        f"{live.api_url}/v1/events", content=b'{"org_id": "a", "user_id": "b"}', headers=headers
    )
    assert response.status_code == 401


def test_a_leaked_token_in_binary_mode_is_hashed_before_it_is_stored(live: LiveStack) -> None:
    _, _, pat, _ = leaver(live)
    event_id = f"evt-{uuid.uuid4().hex[:12]}"
    headers = binary_headers(event_id, **{"ce-type": "token.leak_suspected"})
    response = httpx.post(
        f"{live.api_url}/v1/events",
        content=json.dumps({"token": pat, "reporter": "scanner"}).encode(),
        headers={**headers, "content-type": "application/json; charset=utf-8"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    live.wait_for(lambda: live.verify(pat).reason == "revoked", message="the leaked PAT revoked")
    (stored,) = live.events(event_id)
    assert pat not in json.dumps(stored)
    assert pat not in live.logs()
