"""The README's runnable examples, run as a new user pastes them, so that none can rot.

A fenced ``sh`` block right after a ``<!-- runnable -->`` line is one example. Each runs in a
shell of its own from the repository's root, in README order, against a real
``tokenwarden run`` on a throw-away home. A command in it may fail only where its line's
comment says so, with that status (``# refused: … (exit 1)``); every other failure, a
mistyped option or an unset variable, fails the test and names the command.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests import mail_samples
from tests.conftest import REPO, TOKENWARDEN, clean_env
from tokenwarden.worker.domain import notices
from tokenwarden.worker.ops.supervisor import free_port, wait_for_http
from tokenwarden.worker.runtime import mail

MARKER = "<!-- runnable -->"
BLOCK = re.compile(re.escape(MARKER) + r"\n```sh\n(.*?)^```", re.DOTALL | re.MULTILINE)
EXPECTED_EXIT = re.compile(r"^(?P<command>[^#]+?)\s+#.*\(exit (?P<status>\d+)\)\s*$")
FAILED = re.compile(r"^README-FAILED (?P<status>\d+) (?P<command>.*)$", re.MULTILINE)
# Run as pasted (no errexit: a refusal is part of the story), but with unset variables an
# error, and every failing command, in a command substitution too, reported.
PREAMBLE = """set -u -o pipefail -o errtrace
trap 'echo "README-FAILED $? $BASH_COMMAND" >&2' ERR
"""

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Example:
    line: int  # of the README, where the block starts
    script: str

    def expected_failures(self) -> list[tuple[int, str]]:
        found = (EXPECTED_EXIT.match(line) for line in self.script.splitlines())
        return [(int(m["status"]), m["command"].strip()) for m in found if m]


def examples(readme: Path = REPO / "README.md") -> list[Example]:
    text = readme.read_text(encoding="utf-8")
    return [
        Example(text.count("\n", 0, match.start()) + 2, match.group(1))
        for match in BLOCK.finditer(text)
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``tokenwarden run`` on a throw-away home; the environment a second shell would have."""
    home = tmp_path_factory.mktemp("readme") / "home"
    port = free_port()
    env = clean_env(
        TOKENWARDEN_HOME=str(home),
        TOKENWARDEN_API_PORT=str(port),
        TOKENWARDEN_API_URL=f"http://127.0.0.1:{port}",
    )
    env["PATH"] = f"{TOKENWARDEN.parent}{os.pathsep}{env.get('PATH', '')}"
    log = home.parent / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen(
            [str(TOKENWARDEN), "run"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/readyz", 90), log.read_text()
        wait_for_worker(env)
        yield env
    finally:
        os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


def wait_for_worker(env: dict[str, str], timeout_s: float = 90.0) -> None:
    """Until the worker has applied an event of an organization no example uses."""
    data = json.dumps({"org_id": "readme-probe", "user_id": "probe", "role": "user"})
    cli = [str(TOKENWARDEN)]
    sent = subprocess.run(
        [*cli, "emit", "membership.added", "--data", data],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = subprocess.run(
            [*cli, "events", "--status", "done", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        if any(event["id"] == sent for event in json.loads(listed.stdout)["events"]):
            return
        time.sleep(0.2)
    raise AssertionError("the worker did not apply an event within 90 s")


def run_example(example: Example, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", PREAMBLE + example.script],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_readme_has_runnable_examples() -> None:
    found = examples()
    assert len(found) >= 2
    # The first session shows the point: a leaver's PAT refused, and said so.
    assert any("membership.removed" in e.script and e.expected_failures() for e in found)


def test_every_runnable_example_works_as_pasted(stack: dict[str, str]) -> None:
    for example in examples():
        done = run_example(example, stack)
        where = f"README.md line {example.line}:\n{done.stdout}\n{done.stderr}"
        failed = [(int(m["status"]), m["command"].strip()) for m in FAILED.finditer(done.stderr)]
        assert failed == example.expected_failures(), where
        assert done.returncode == 0, where
        assert "Traceback" not in done.stderr, where
        if "membership.removed" in example.script:
            # The leave refused bob's PAT and kept the application token he had created.
            assert re.search(r"^refused: token tok_\w+ revoked$", done.stdout, re.M), where
            assert "usable: application token" in done.stdout, where


def test_a_broken_example_is_caught(stack: dict[str, str]) -> None:
    """The check itself: a refusal its comment does not announce, or a typo, is reported."""
    script = 'tokenwarden token verify --token "sm_pat_nope"\ntokenwarden token lsit\n'
    done = run_example(Example(0, script), stack)
    failed = [(int(m["status"]), m["command"]) for m in FAILED.finditer(done.stderr)]
    assert failed == [
        (1, 'tokenwarden token verify --token "sm_pat_nope"'),
        (2, "tokenwarden token lsit"),
    ]


def test_the_readme_shows_each_kind_of_email_as_it_is_sent() -> None:
    target = mail.MailTarget(
        host="mail.example", port=25, implicit_tls=False, sender="tokenwarden@example.com"
    )
    readme = (REPO / "README.md").read_text()
    shown = re.findall(r"```text\n(Subject: .*?)\n```", readme, flags=re.S)
    built = []
    for kind, data in mail_samples.SAMPLES:
        message = mail.build(
            target,
            notice_id=mail_samples.NOTICE_ID,
            body=mail_samples.body(kind, data),
            address="ana@acme.example",
            now=datetime.now(UTC),
        )
        text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        built.append(f"Subject: {message['Subject']}\n{text.rstrip()}")
    assert len(mail_samples.SAMPLES) == len(notices.NEXT_STEPS)  # every kind has its sample
    assert shown == built
