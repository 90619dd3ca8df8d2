"""What tokenwarden leaves on disk and on its standard output is for its owner only.

The home folder holds the producer key and the signing secret, the token store holds emails,
the audit trail and token hashes: all of it is created readable by its owner alone. The
producer key that ``run`` generates is shown on a terminal, never written into a log file.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TOKENWARDEN, Cli, clean_env, within_lifetime
from tokenwarden.worker.domain.models import TokenKind
from tokenwarden.worker.domain.tokens import TOKEN_PATTERN, generate
from tokenwarden.worker.ops.supervisor import free_port, wait_for_http

pytestmark = pytest.mark.slow

FAR_DATE = within_lifetime()


def _modes(home: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(home.stat().st_mode)}
    for path in home.rglob("*"):
        found[str(path.relative_to(home))] = stat.S_IMODE(path.stat().st_mode)
    return found


def _loose(home: Path) -> dict[str, str]:
    """Every path in ``home`` that anyone but its owner may read, write or enter."""
    return {name: oct(mode) for name, mode in _modes(home).items() if mode & 0o077}


def test_a_new_home_and_its_token_store_are_readable_by_their_owner_alone(
    tmp_path: Path,
) -> None:
    home = tmp_path / "fresh" / "home"
    cli = Cli(tmp_path, clean_env(TOKENWARDEN_HOME=str(home)))

    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    cli("token", "create", "--kind", "personal", "--org", "acme", "--user", "bob",
        "--name", "laptop", "--expires-at", FAR_DATE, check=True)  # fmt: skip

    assert (home / "tokenwarden.db").exists()
    assert _loose(home) == {}
    assert _modes(home)["."] == 0o700
    assert _modes(home)["tokenwarden.db"] == 0o600


def test_files_an_earlier_version_left_open_are_made_private_by_the_next_command(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    cli = Cli(tmp_path, clean_env(TOKENWARDEN_HOME=str(home)))
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    # What a version that did not restrict its files left behind, readable by everyone.
    (home / "producer.key").write_text("twp_" + "k" * 43 + "\n")
    (home / "notice-signing.secret").write_text("whsec_" + "A" * 44 + "\n")
    (home / "celerybeat-schedule").write_bytes(b"")
    (home / "tokenwarden.db.sweep.lock").write_bytes(b"")
    (home / "broker" / "queue").mkdir(parents=True)
    (home / "broker" / "processed").mkdir()
    for path in [home, *home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    cli("token", "list", check=True)

    # The home folder may be one the operator made: it keeps its mode (the README says how
    # to tighten it); what tokenwarden keeps in it is private again.
    assert _loose(home) == {".": "0o755"}
    assert _modes(home)["tokenwarden.db"] == 0o600
    assert _modes(home)["broker/queue"] == 0o700


class Run:
    """``tokenwarden run`` on a fresh embedded home, its output going to ``output``."""

    def __init__(self, tmp_path: Path, *, stdout: int) -> None:
        self.home = tmp_path / "home"
        self.port = free_port()
        env = clean_env(TOKENWARDEN_HOME=str(self.home), TOKENWARDEN_API_PORT=str(self.port))
        self.process = subprocess.Popen(
            [str(TOKENWARDEN), "run"],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )

    def wait_until_up(self) -> None:
        assert wait_for_http(f"http://127.0.0.1:{self.port}/healthz", 60), "run did not start"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def logged_run(tmp_path: Path) -> Iterator[tuple[Run, Path]]:
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = Run(tmp_path, stdout=out.fileno())
        try:
            run.wait_until_up()
            yield run, log
        finally:
            run.stop()


def _until(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)


def test_run_into_a_log_file_says_where_the_key_is_and_never_prints_it(
    logged_run: tuple[Run, Path],
) -> None:
    run, log = logged_run
    key_file = run.home / "producer.key"
    _until(lambda: "producer key" in log.read_text())

    output = log.read_text()
    key = key_file.read_text().strip()
    assert key not in output
    assert f"producer key  in {key_file.resolve()}" in output
    assert f"$(cat {key_file.resolve()})" in output  # the curl example still works as printed


def test_run_creates_every_file_of_its_home_for_its_owner_alone(
    logged_run: tuple[Run, Path],
) -> None:
    run, _ = logged_run
    _until(
        lambda: (run.home / "broker" / "queue").exists() and (run.home / "producer.key").exists()
    )

    modes = _modes(run.home)
    assert {"producer.key", "tokenwarden.db", "broker", "broker/queue"} <= modes.keys()
    assert _loose(run.home) == {}


def test_run_on_a_terminal_shows_the_key(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    run = Run(tmp_path, stdout=terminal)
    os.close(terminal)
    shown = b""
    try:
        run.wait_until_up()
        deadline = time.monotonic() + 20
        while b"Ctrl-C" not in shown and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.2)[0]:
                shown += os.read(controller, 65536)
    finally:
        run.stop()
        os.close(controller)

    key = (run.home / "producer.key").read_text().strip()
    assert f"producer key  {key}".encode() in shown


def test_revoke_never_echoes_a_token_given_in_place_of_an_id(cli_home: Cli) -> None:
    token = generate(TokenKind.APPLICATION)

    result = cli_home("token", "revoke", token, "--confirm", "DELETE")

    assert result.code == 2
    assert token not in result.stderr + result.stdout
    assert not TOKEN_PATTERN.search(result.stderr + result.stdout)
    assert "that is a token, not a token id" in result.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        ("token", "create", "--kind", "{token}", "--org", "o", "--user", "u", "--name", "n",
         "--expires-at", FAR_DATE),
        ("token", "create", "--kind", "personal", "--org", "o", "--user", "u", "--name", "n",
         "--expires-at", "{token}"),
        ("events", "--status", "{token}"),
        ("token", "list", "--org", "o", "{token}"),
    ],
    ids=["click-choice", "our-own-check", "status", "extra-argument"],
)  # fmt: skip
def test_no_refusal_of_the_command_line_echoes_a_token(
    cli_home: Cli, arguments: tuple[str, ...]
) -> None:
    token = generate(TokenKind.PERSONAL)

    result = cli_home(*(argument.format(token=token) for argument in arguments))

    assert result.code == 2
    assert result.stderr
    assert not TOKEN_PATTERN.search(result.stderr + result.stdout)


@pytest.mark.parametrize(
    "arguments",
    [
        ("member", "add", "--org", "acme", "--user", "{token}", "--role", "user"),
        ("member", "add", "--org", "acme", "--user", "carol", "--role", "user",
         "--email", "{token}@acme.example"),
        ("token", "create", "--kind", "personal", "--org", "acme", "--user", "bob",
         "--name", "ci {token}", "--expires-at", FAR_DATE),
        ("token", "create", "--kind", "application", "--org", "acme", "--app", "{token}",
         "--created-by", "bob", "--name", "deploys", "--expires-at", FAR_DATE),
        ("token", "revoke", "{token_id}", "--confirm", "DELETE", "--actor", "{token}"),
    ],
    ids=["member-user", "member-email", "token-name", "token-app", "revoke-actor"],
)  # fmt: skip
def test_a_token_typed_as_an_id_or_a_name_is_refused_never_stored_nor_echoed(
    cli_home: Cli, arguments: tuple[str, ...]
) -> None:
    cli_home("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    created = cli_home("token", "create", "--kind", "personal", "--org", "acme", "--user",
                       "bob", "--name", "laptop", "--expires-at", FAR_DATE, "--json",
                       check=True)  # fmt: skip
    token_id = json.loads(created.stdout)["id"]
    typed = generate(TokenKind.PERSONAL)

    result = cli_home(*(a.format(token=typed, token_id=token_id) for a in arguments))

    assert result.code == 2
    assert "holds a token" in result.stderr
    assert not TOKEN_PATTERN.search(result.stderr + result.stdout)
    home = Path(cli_home.env["TOKENWARDEN_HOME"])
    stored = b"".join(path.read_bytes() for path in home.glob("tokenwarden.db*"))
    assert stored
    assert typed[7:].encode() not in stored
    listed = cli_home("token", "list", check=True).stdout
    audited = cli_home("audit", check=True).stdout
    assert not TOKEN_PATTERN.search(listed + audited)
    assert "revoked" not in listed


@pytest.fixture
def cli_home(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    return Cli(tmp_path, clean_env(TOKENWARDEN_HOME=str(home)))
