"""The real ``tokenwarden`` console script, as a new user and their scripts would drive it."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.conftest import TOKENWARDEN, Cli, Result, clean_env, within_lifetime
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import TokenKind
from tokenwarden.worker.domain.tokens import checksum, kind_of

FAR = within_lifetime() + "T00:00:00Z"
LATER = within_lifetime(200)


def refused(result: Result) -> str:
    """A refused request: exit 2, one line on stderr, no traceback; return that line."""
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def create(cli: Cli, *, expires_at: str = FAR, **options: str) -> dict[str, Any]:
    """``token create --json`` with ``kind=…, user=…`` spelled as the CLI's options."""
    args = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    result = cli("token", "create", *args, f"--expires-at={expires_at}", "--json", check=True)
    issued: dict[str, Any] = result.json()
    return issued


def verify(cli: Cli, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("token", "verify", *args, "--json")
    assert "Traceback" not in result.stderr
    verdict: dict[str, Any] = result.json()
    return result.code, verdict


def test_new_user_story(cli: Cli) -> None:
    admin = cli(
        "member", "add", "--org", "acme", "--user", "alice", "--role", "admin", "--json", check=True
    )
    assert admin.json() == {
        "org_id": "acme",
        "user_id": "alice",
        "role": "admin",
        "email": None,
        "active": True,
    }
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)

    pat = create(cli, kind="personal", org="acme", user="bob", name="laptop")
    aat = create(
        cli,
        kind="application",
        org="acme",
        app="ci",
        created_by="alice",
        name="deploy",
        expires_at=LATER,
    )
    assert set(pat) == set(aat) == {"id", "token", "kind", "expires_at"}
    assert (pat["kind"], aat["kind"]) == ("personal", "application")
    assert pat["token"].startswith("sm_pat_")
    assert aat["token"].startswith("sm_aat_")
    assert kind_of(pat["token"]) is TokenKind.PERSONAL
    assert kind_of(aat["token"]) is TokenKind.APPLICATION
    assert pat["id"] != aat["id"]
    assert datetime.fromisoformat(pat["expires_at"]) == datetime.fromisoformat(FAR)
    assert datetime.fromisoformat(aat["expires_at"]) == datetime.fromisoformat(LATER + "T00:00:00Z")

    p, a = pat["token"], aat["token"]
    forms = [
        (pat, "--token", p),
        (pat, "--header", f"x-auth-token: {p}"),
        (aat, "--header", f"X-Auth-Token:{a}  "),
        (pat, "--url", f"https://svc.example/v1/query?token={p}&x=1"),
        (aat, "--url", f"https://svc.example/rpc/{a}"),
        (pat, "--url", f"https://ipfs.example/{p}/api/v0/add?arg=x"),
        (aat, "--url", f"https://avax.example/ext/bc/C/rpc/{a}"),
    ]
    for issued, option, value in forms:
        code, verdict = verify(cli, option, value)
        assert code == 0, (option, value, verdict)
        assert verdict["usable"] is True
        principal = verdict["principal"]
        assert principal["token_id"] == issued["id"]
        assert principal["kind"] == issued["kind"]
        assert principal["org_id"] == "acme"
        if issued is pat:
            assert (principal["user_id"], principal["role"]) == ("bob", "user")
        else:
            assert (principal["app_id"], principal["created_by"]) == ("ci", "alice")

    table = cli("token", "list", check=True)
    assert pat["id"] in table.stdout
    assert aat["id"] in table.stdout
    assert f"…{p[-4:]}" in table.stdout
    assert f"…{a[-4:]}" in table.stdout
    assert "active" in table.stdout
    assert p not in table.stdout
    assert a not in table.stdout

    # Deleting needs the exact word; anything else changes nothing.
    for confirm in ([], ["--confirm", "delete"]):
        line = refused(cli("token", "revoke", pat["id"], *confirm))
        assert "--confirm DELETE" in line
    assert verify(cli, "--token", p)[0] == 0

    revoked = cli(
        "token", "revoke", pat["id"], "--confirm", "DELETE", "--actor", "ops", "--json", check=True
    )
    assert revoked.json() == {"id": pat["id"], "revoked": True, "state": "revoked"}
    code, verdict = verify(cli, "--url", f"https://svc.example/{p}")
    assert code == 1
    assert verdict == {"usable": False, "reason": "revoked", "token_id": pat["id"]}
    again = cli("token", "revoke", pat["id"], "--confirm", "DELETE", "--json", check=True)
    assert again.json() == {"id": pat["id"], "revoked": False, "state": "revoked"}

    listed = cli("token", "list", "--json", check=True)
    assert p not in listed.stdout
    assert a not in listed.stdout
    by_id = {row["id"]: row for row in listed.json()}
    assert by_id.keys() == {pat["id"], aat["id"]}
    assert (by_id[pat["id"]]["state"], by_id[pat["id"]]["reason"]) == ("revoked", "deleted")
    assert (by_id[aat["id"]]["state"], by_id[aat["id"]]["reason"]) == ("active", None)
    assert by_id[pat["id"]]["hint"] == p[-4:]
    assert by_id[aat["id"]]["hint"] == a[-4:]

    trail = cli("audit", "--json", check=True).json()
    revocations = [e for e in trail if e["action"] == "revoke"]
    assert len(revocations) == 1
    (revocation,) = revocations
    assert revocation["token_id"] == pat["id"]
    assert (revocation["reason"], revocation["source"], revocation["actor"]) == (
        "deleted",
        "cli",
        "ops",
    )
    assert {"token_id": pat["id"], "action": "refuse", "reason": "revoked"}.items() <= next(
        e for e in trail if e["action"] == "refuse"
    ).items()


def test_verify_says_why_a_token_is_not_usable(cli: Cli) -> None:
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    token = create(cli, kind="personal", org="acme", user="bob", name="n")["token"]
    typo = token[:-1] + ("0" if token[-1] != "0" else "1")
    head = token[:7] + "A" * 32
    unknown = head + checksum(head)

    assert verify(cli, "--token", typo) == (
        1,
        {"usable": False, "reason": "malformed", "token_id": None},
    )
    assert verify(cli, "--token", unknown) == (
        1,
        {"usable": False, "reason": "unknown", "token_id": None},
    )
    code, verdict = verify(cli, "--url", "https://svc.example/")
    assert (code, verdict["usable"], verdict["reason"]) == (1, False, "malformed")
    text = cli("token", "verify", "--header", f"x-auth-token: {typo}")
    assert text.code == 1
    assert "malformed" in text.stdout
    assert typo not in text.stdout + text.stderr


def test_verify_with_an_empty_url_blames_the_url(cli: Cli) -> None:
    code, verdict = verify(cli, "--url", "")

    assert (code, verdict["reason"]) == (1, "malformed")
    assert "header" not in verdict["detail"]
    assert "URL" in verdict["detail"]


def test_refusals_change_nothing(cli: Cli) -> None:
    cli("member", "add", "--org", "acme", "--user", "alice", "--role", "admin", check=True)
    pat = ("token", "create", "--kind", "personal", "--org", "acme", "--name", "n")

    assert "mallory" in refused(cli(*pat, "--user", "mallory", "--expires-at", FAR))
    refused(cli(*pat, "--user", "alice", "--expires-at", "2020-01-01"))
    assert "--expires-at" in refused(cli(*pat, "--user", "alice", "--expires-at", "next week"))
    refused(cli("token", "verify", "--token", "sm_pat_x", "--url", "https://svc.example/x"))

    assert cli("token", "list", "--json", check=True).json() == []
    actions = [entry["action"] for entry in cli("audit", "--json", check=True).json()]
    assert actions == ["member"]


def test_bad_configuration_is_one_line_naming_the_variable(cli: Cli) -> None:
    for variable, value in [
        ("TOKENWARDEN_API_PORT", "notaport"),
        ("TOKENWARDEN_DATABASE_URL", "mysql://x"),
        ("TOKENWARDEN_BROKER_URL", "amqps2://broker.example//"),
    ]:
        broken = Cli(cli.home, {**cli.env, variable: value})
        result = broken("token", "list")
        assert variable in refused(result)
        assert result.stdout == ""


def test_an_unreachable_database_is_named_by_its_setting(cli: Cli) -> None:
    url = "postgresql://tw:hunter2secret@127.0.0.1:1/tokenwarden"
    broken = Cli(cli.home, {**cli.env, "TOKENWARDEN_DATABASE_URL": url})
    for command in (("token", "list"), ("db", "upgrade"), ("audit",)):
        line = refused(broken(*command))
        assert line.startswith("error: TOKENWARDEN_DATABASE_URL: "), line
        assert "127.0.0.1:1" in line
        assert "hunter2secret" not in line


def test_db_upgrade_reports_the_revision(cli: Cli) -> None:
    result = cli("db", "upgrade", "--json", check=True)

    report = result.json()
    assert report["revision"] == db.head_revision()
    assert report["revision"] is not None
    assert report["database"]


def test_version_and_usage_mistakes_are_one_line(cli: Cli) -> None:
    version = cli("--version", check=True)
    assert version.stdout.startswith("tokenwarden, version ")
    for args, says in [
        (("member", "add", "--org", "acme"), "error: Missing option '--user'."),
        (("token", "verify", "--kind", "x"), "error: No such option '--kind'."),
        (("nosuch",), "error: No such command 'nosuch'."),
    ]:
        done = cli(*args)
        assert done.code == 2
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(says), line
        assert line.endswith("--help)")


def test_member_remove_revokes_like_the_event_and_member_list_shows_it(cli: Cli) -> None:
    cli("member", "add", "--org", "acme", "--user", "alice", "--role", "admin", check=True)
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    cli("member", "add", "--org", "globex", "--user", "bob", "--role", "user", check=True)
    expiry = within_lifetime()
    pat = ("token", "create", "--kind", "personal", "--user", "bob", "--name", "laptop")
    here = cli(*pat, "--org", "acme", "--expires-at", expiry, "--json", check=True).json()
    there = cli(*pat, "--org", "globex", "--expires-at", expiry, "--json", check=True).json()
    app = ("--app", "deployer", "--created-by", "bob", "--name", "deploys")
    aat = cli(
        *("token", "create", "--kind", "application", "--org", "acme", *app),
        *("--expires-at", expiry, "--json"),
        check=True,
    ).json()

    removed = cli("member", "remove", "--org", "acme", "--user", "bob", "--json", check=True)
    assert removed.json()["revoked"] == [here["id"]]
    assert cli("token", "verify", "--token", here["token"]).code == 1
    assert cli("token", "verify", "--token", there["token"]).code == 0
    assert cli("token", "verify", "--token", aat["token"]).code == 0
    # Again: nothing more happens, and it is no error.
    again = cli("member", "remove", "--org", "acme", "--user", "bob", "--json", check=True)
    assert again.json()["revoked"] == []

    listed = cli("member", "list", "--org", "acme", "--json", check=True).json()
    assert [(m["user_id"], m["active"]) for m in listed] == [("alice", True), ("bob", False)]
    table = cli("member", "list", check=True).stdout
    assert "globex  bob" in table
    assert "ended" in table
    # The same audit rows as a membership.removed event, with the CLI as their source.
    trail = cli("audit", "--user", "bob", "--json", check=True).json()
    rows = trail["entries"] if isinstance(trail, dict) else trail
    revoked = [r for r in rows if r["action"] == "revoke"]
    assert [(r["token_id"], r["reason"], r["source"]) for r in revoked] == [
        (here["id"], "member_removed", "cli")
    ]
    assert any(r["action"] == "member" and r["reason"] == "removed" for r in rows)
    # The admins hear of it as they would of the event: the PAT revoked, the AAT now orphaned.
    notices = cli("notices", "--json", check=True).json()
    told = notices["notices"] if isinstance(notices, dict) else notices
    assert sorted(n["kind"] for n in told) == ["application_tokens.orphaned", "member.offboarded"]


def test_the_default_home_is_the_same_from_any_folder_and_a_new_store_is_announced(
    tmp_path: Path,
) -> None:
    env = clean_env(XDG_DATA_HOME=str(tmp_path / "data"))

    def run_in(folder: str, *args: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / folder).mkdir(exist_ok=True)
        return subprocess.run(
            [str(TOKENWARDEN), *args],
            env=env,
            cwd=tmp_path / folder,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    first = run_in("a", "member", "add", "--org", "acme", "--user", "bob", "--role", "user")
    home = tmp_path / "data" / "tokenwarden"
    assert first.stderr == f"tokenwarden: created a new token store in {home} (TOKENWARDEN_HOME)\n"
    created = run_in(
        "b",
        *("token", "create", "--kind", "personal", "--org", "acme", "--user", "bob"),
        *("--name", "laptop", "--expires-at", within_lifetime(), "--json"),
    )
    assert created.stderr == ""  # the same store: nothing new to say
    token = json.loads(created.stdout)["token"]
    assert run_in("c", "token", "verify", "--token", token).returncode == 0


def test_token_list_shows_a_token_rotated_away_as_revoked_once_its_overlap_ends(cli: Cli) -> None:
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    old = cli(
        *("token", "create", "--kind", "personal", "--org", "acme", "--user", "bob"),
        *("--name", "laptop", "--expires-at", within_lifetime(), "--json"),
        check=True,
    ).json()
    # Long enough for a command to start and answer inside it on a slow machine.
    new = cli("token", "rotate", old["id"], "--overlap", "4s", "--json", check=True).json()
    overlap_ends = time.monotonic() + 4

    def shown() -> dict[str, tuple[str, str | None]]:
        listed = cli("token", "list", "--org", "acme", "--json", check=True).json()
        return {t["id"]: (t["state"], t["reason"]) for t in listed}

    assert shown()[old["id"]] == ("active", None)  # inside its overlap
    time.sleep(max(0.0, overlap_ends - time.monotonic()) + 0.5)
    # Nobody presented it since, and the list still tells the truth (as the token API does).
    assert shown() == {old["id"]: ("revoked", "rotated"), new["id"]: ("active", None)}
