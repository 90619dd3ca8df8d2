"""``tokenwarden demo``: the story of a leaver, told on a throw-away embedded stack.

It drives the stack over HTTP and reads the store; it must not import ``tasks`` or ``producer``
(the stack runs them in its own processes).
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.issuing import IssuedToken, create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import TokenKind
from tokenwarden.worker.domain.verification import Verdict, verify_token
from tokenwarden.worker.ops.demo_peers import KEY_ID, Peers
from tokenwarden.worker.ops.supervisor import Stack, child_env, command, free_port, wait_for_http

Say = Callable[[str], None]


@dataclass
class Step:
    what: str
    expected: str
    seen: str
    held: bool


@dataclass
class Demo:
    home: Path
    api_url: str
    key: str
    say: Say
    peers: Peers
    steps: list[Step] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"sqlite:///{self.home / 'tokenwarden.db'}"

    @contextmanager
    def session(self) -> Iterator[Any]:
        with db.transaction(db.engine_for(self.url)) as session:
            yield session

    def check(self, what: str, expected: str, seen: str) -> bool:
        held = expected == seen
        self.steps.append(Step(what, expected, seen, held))
        self.say(
            f"   {'ok ' if held else 'FAILED'} {what}: {seen}"
            + ("" if held else f" (expected {expected})")
        )
        return held

    def member(self, org: str, user: str, role: str, email: str) -> None:
        now = datetime.now(UTC)
        with self.session() as session:
            add_member(
                session,
                org_id=org,
                user_id=user,
                role=role,
                email=email,
                at=now,
                now=now,
                source="demo",
            )

    def issue(self, kind: TokenKind, org: str, owner: str, name: str) -> IssuedToken:
        now = datetime.now(UTC)
        owners = (
            {"user_id": owner}
            if kind is TokenKind.PERSONAL
            else {"app_id": owner, "created_by": "bob"}
        )
        with self.session() as session:
            return create_token(
                session,
                kind=kind,
                org_id=org,
                name=name,
                expires_at=now + timedelta(days=90),
                now=now,
                source="demo",
                **owners,
            )

    def verify(self, token: IssuedToken) -> Verdict:
        with self.session() as session:
            return verify_token(session, token.token, now=datetime.now(UTC), source="demo")

    def state(self, token: IssuedToken) -> str:
        verdict = self.verify(token)
        return "usable" if verdict.usable else f"refused ({verdict.reason})"

    def wait(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)

    def notice(self, kind: str) -> dict[str, Any] | None:
        """The first signed notice of ``kind`` the receiver got (waiting a little for it)."""
        self.wait(lambda: any(n.get("type") == kind for n in self.peers.notices))
        return next((n for n in self.peers.notices if n.get("type") == kind), None)

    def post(self, type_: str, data: dict[str, str]) -> httpx.Response:
        body = {
            "specversion": "1.0",
            "id": f"demo-{uuid.uuid4().hex[:10]}",
            "source": "hr://demo",
            "type": type_,
            "time": datetime.now(UTC).isoformat(),
            "data": data,
        }
        return httpx.post(
            f"{self.api_url}/v1/events",
            json=body,
            timeout=10,
            headers={"Authorization": f"Bearer {self.key}"},
        )


def run_demo(say: Say, *, keep: bool = False) -> tuple[bool, list[Step], Path]:
    """Run the story; return whether every step held, the steps and the home folder."""
    home = Path(tempfile.mkdtemp(prefix="tokenwarden-demo-"))
    port = free_port()
    key = "twp_demo_" + secrets.token_urlsafe(16)
    peers = Peers()
    peers.start()
    demo = Demo(home=home, api_url=f"http://127.0.0.1:{port}", key=key, say=say, peers=peers)
    db.upgrade(demo.url)
    logs = (home / "stack.log").open("ab")
    stack = Stack(
        {
            "api": command("api"),
            "worker": command("worker", "-c", "1"),
            "scheduler": command("beat"),
        },
        env=_environment(demo, port),
        output=logs,
    )
    say(f"Starting the API, a worker and the scheduler on a throw-away home ({home}).")
    stack.start()
    try:
        if not wait_for_http(f"{demo.api_url}/healthz", 60):
            demo.check("the stack starts", "up", "down")
            return False, demo.steps, home
        _story(demo)
    finally:
        stack.stop()
        peers.stop()
        logs.close()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
    return all(step.held for step in demo.steps), demo.steps, home


def _environment(demo: Demo, port: int) -> dict[str, str]:
    """The stack's environment: the demo's home, key, port and peers, nothing of the caller's
    store, broker or API."""
    env = child_env(
        TOKENWARDEN_HOME=str(demo.home),
        TOKENWARDEN_PRODUCER_KEYS=demo.key,
        TOKENWARDEN_API_PORT=str(port),
        TOKENWARDEN_REDRIVE_AFTER_S="5",
        TOKENWARDEN_GITHUB_KEYS_URL=f"{demo.peers.base}/keys",
        TOKENWARDEN_NOTICE_WEBHOOK_URL=f"{demo.peers.base}/notices",
        TOKENWARDEN_NOTICE_SIGNING_SECRET=demo.peers.secret,
    )
    for variable in (
        "TOKENWARDEN_DATABASE_URL",
        "TOKENWARDEN_BROKER_URL",
        "TOKENWARDEN_PRODUCER_KEY",
        "TOKENWARDEN_API_URL",
    ):
        env.pop(variable, None)
    return env


def _story(demo: Demo) -> None:
    pat, aat, globex = _members_and_tokens(demo)
    _bob_leaves(demo, pat, aat, globex)
    _deploy_token_leaks(demo, aat)


def _members_and_tokens(demo: Demo) -> tuple[IssuedToken, IssuedToken, IssuedToken]:
    """Steps 1 and 2: bob's acme PAT, acme's deploy AAT and bob's globex PAT, all usable."""
    say = demo.say
    say("1. alice (admin) and bob (user) are members of acme; bob is also in globex.")
    demo.member("acme", "alice", "admin", "alice@acme.example")
    demo.member("acme", "bob", "user", "bob@acme.example")
    demo.member("globex", "bob", "user", "bob@globex.example")
    say("2. bob creates a personal token for acme, an application token for acme's deploy")
    say("   bot, and a personal token for globex.")
    pat = demo.issue(TokenKind.PERSONAL, "acme", "bob", "bob's laptop")
    aat = demo.issue(TokenKind.APPLICATION, "acme", "deploy-bot", "deploys")
    globex = demo.issue(TokenKind.PERSONAL, "globex", "bob", "bob at globex")
    for name, token in (("bob's acme PAT", pat), ("acme's AAT", aat), ("bob's globex PAT", globex)):
        demo.check(f"{name} …{token.token[-4:]}", "usable", demo.state(token))
    return pat, aat, globex


def _bob_leaves(demo: Demo, pat: IssuedToken, aat: IssuedToken, globex: IssuedToken) -> None:
    """Steps 3 and 4: HR's event revokes bob's acme PAT only, audited and noticed."""
    say = demo.say
    say("3. HR says bob left acme: a membership.removed event goes to the producer API.")
    response = demo.post("membership.removed", {"org_id": "acme", "user_id": "bob"})
    demo.check("the API accepts the event", "202", str(response.status_code))
    started = time.monotonic()
    while time.monotonic() - started < 10 and demo.verify(pat).usable:
        time.sleep(0.05)
    took = time.monotonic() - started
    say(f"   the worker applied it {took * 1000:.0f} ms after the API accepted it")

    say("4. What still works?")
    demo.check("bob's acme PAT", "refused (revoked)", demo.state(pat))
    demo.check("acme's AAT (bob created it, but it belongs to the app)", "usable", demo.state(aat))
    demo.check("bob's globex PAT (another organization)", "usable", demo.state(globex))
    with demo.session() as session:
        from tokenwarden.worker.domain.audit import trail

        revoked = [e for e in trail(session, token_id=pat.id) if e.action == "revoke"]
    seen = f"{revoked[0].reason} from {revoked[0].source}" if revoked else "none"
    demo.check("the audit trail explains it", "member_removed from hr://demo", seen)
    offboarded = demo.notice("member.offboarded")
    demo.check(
        "a signed offboarding notice reaches acme's admins",
        "alice, listing …" + pat.token[-4:],
        _addressed(offboarded),
    )


def _deploy_token_leaks(demo: Demo, aat: IssuedToken) -> None:
    """Step 5: GitHub reports the deploy token; it is revoked and acme's admins are told."""
    demo.say("5. acme's deploy token is pushed to a public repository; GitHub's secret scanning")
    demo.say("   finds it and reports it, signed with GitHub's key (a key pair the demo made).")
    response = _report_to_github(demo, aat)
    label = response.json()[0]["label"] if response.status_code == 200 else response.status_code
    demo.check("GitHub is told it was a real token", "true_positive", str(label))
    demo.wait(lambda: not demo.verify(aat).usable)
    demo.check("the leaked AAT", "refused (revoked)", demo.state(aat))
    leaked = demo.notice("token.leaked")
    demo.check(
        "a signed leak notice reaches acme's admins",
        "alice, listing …" + aat.token[-4:],
        _addressed(leaked),
    )
    where = (leaked or {}).get("data", {}).get("source_url")
    demo.check(
        "the notice says where it leaked", "https://github.com/acme/site/blob/main/.env", str(where)
    )
    demo.check(
        "every notice's signature checked out", "0 rejected", f"{demo.peers.rejected} rejected"
    )


def _report_to_github(demo: Demo, aat: IssuedToken) -> httpx.Response:
    """Post GitHub's signed report of ``aat`` found in a public repository."""
    report = json.dumps(
        [
            {
                "token": aat.token,
                "type": "settlemint_application_access_token",
                "url": "https://github.com/acme/site/blob/main/.env",
                "source": "content",
            }
        ]
    ).encode()
    return httpx.post(
        f"{demo.api_url}/v1/secret-scanning/github",
        content=report,
        timeout=10,
        headers={
            "Content-Type": "application/json",
            "Github-Public-Key-Identifier": KEY_ID,
            "Github-Public-Key-Signature": demo.peers.sign(report),
        },
    )


def _addressed(notice: dict[str, Any] | None) -> str:
    if notice is None:
        return "no notice"
    data = notice.get("data", {})
    who = ", ".join(r["user_id"] for r in data.get("recipients", []))
    hints = ", ".join("…" + t["last4"] for t in data.get("tokens", []))
    return f"{who}, listing {hints}"
