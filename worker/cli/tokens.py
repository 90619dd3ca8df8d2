"""``tokenwarden token``: issue, list, verify and revoke tokens.

Must not import ``tasks`` or ``producer``.
"""

from __future__ import annotations

import getpass
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Final

import click
from sqlalchemy.orm import Session

from tokenwarden.worker.cli.common import (
    EXIT_REFUSED,
    NO_TOKEN,
    echo_json,
    echo_listing,
    fail,
    json_option,
    parse_instant,
    reading,
    record,
    store,
    transaction,
)
from tokenwarden.worker.domain import clock, db
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.models import Token, TokenKind
from tokenwarden.worker.domain.tokens import TOKEN_PATTERN, ExtractError, from_header, from_url

# Each command imports the domain modules it uses itself: a short command such as `token
# verify` or `token list` then loads only its own (start-up is most of its time).


@click.group()
def token() -> None:
    """Personal and application access tokens."""


@token.command()
@click.option("--kind", required=True, type=click.Choice(["personal", "application"]))
@click.option(
    "--org", "org_id", required=True, type=NO_TOKEN, help="Organization the token works for."
)
@click.option("--user", "user_id", default=None, type=NO_TOKEN, help="Owner of a personal token.")
@click.option(
    "--app", "app_id", default=None, type=NO_TOKEN, help="Application of an application token."
)
@click.option(
    "--created-by", default=None, type=NO_TOKEN, help="User creating an application token."
)
@click.option("--name", required=True, type=NO_TOKEN, help="What the token is for.")
@click.option("--expires-at", required=True, help="ISO 8601 expiry; cannot be changed later.")
@json_option
def create(
    kind: str,
    org_id: str,
    user_id: str | None,
    app_id: str | None,
    created_by: str | None,
    name: str,
    expires_at: str,
    as_json: bool,
) -> None:
    """Issue a token and print it once: it cannot be shown again."""
    from tokenwarden.worker.domain.issuing import create_token, parse_kind

    parsed = parse_kind(kind)
    if parsed is TokenKind.PERSONAL and app_id:
        fail("--app is for application tokens; a personal token belongs to --user")
    if parsed is TokenKind.APPLICATION and user_id:
        fail("--user is for personal tokens; an application token takes --app and --created-by")
    expiry = parse_instant(expires_at, option="--expires-at")
    with transaction() as session:
        issued = create_token(
            session,
            kind=parsed,
            org_id=org_id,
            name=name,
            expires_at=expiry,
            now=clock.now(),
            user_id=user_id,
            app_id=app_id,
            created_by=created_by,
        )
    if as_json:
        echo_json(
            {
                "id": issued.id,
                "token": issued.token,
                "kind": issued.kind.value,
                "expires_at": issued.expires_at,
            }
        )
        return
    click.echo(f"{issued.kind.value} token {issued.id} for {org_id}, expires {expiry.isoformat()}")
    click.echo("Copy it now; it will not be shown again:")
    click.echo(issued.token)


@token.command("list")
@click.option("--org", "org_id", default=None, help="Only this organization.")
@click.option("--user", "user_id", default=None, help="Only tokens owned or created by this user.")
@json_option
def list_(org_id: str | None, user_id: str | None, as_json: bool) -> None:
    """Tokens with their state and reason; never a secret."""
    from tokenwarden.worker.domain.issuing import list_tokens
    from tokenwarden.worker.domain.token_pages import state_of
    from tokenwarden.worker.domain.usage import last_used

    with reading() as session:
        tokens = list_tokens(session, org_id=org_id, user_id=user_id)
        used = last_used(session, [t.id for t in tokens])
    now = clock.now()
    records = [
        # As the token API shows it: a token past its overlap or its expiry is no longer
        # active, even before anything wrote that down.
        {**_token_json(t), **dict(zip(("state", "reason"), state_of(t, now), strict=True))}
        | {"last_used_at": used.get(t.id)}
        for t in tokens
    ]
    echo_listing(records, _TOKEN_COLUMNS, as_json=as_json)


def _token_json(t: Token) -> dict[str, Any]:
    return record(
        t,
        "id kind org_id user_id app_id created_by name hint created_at expires_at state "
        "revoked_at reason",
        hint="last4",
        reason="revoke_reason",
    )


# The table's columns: header, and the key of the JSON record it shows or what it shows of it.
_TOKEN_COLUMNS: Final[dict[str, str | Callable[[dict[str, Any]], Any]]] = {
    "id": "id",
    "kind": "kind",
    "org": "org_id",
    "owner": lambda t: t["user_id"] or f"app:{t['app_id']}",
    "name": "name",
    "hint": lambda t: f"…{t['hint']}",
    "expires": "expires_at",
    "state": "state",
    "reason": "reason",
    "last used": "last_used_at",
}


@token.command()
@click.option("--token", "text", default=None, help="The token itself.")
@click.option("--url", default=None, help="A URL carrying the token in any accepted form.")
@click.option("--header", default=None, help="A header line: 'x-auth-token: TOKEN'.")
@json_option
def verify(text: str | None, url: str | None, header: str | None, as_json: bool) -> None:
    """Exit 0 and print the principal when the token is usable; exit 1 and why not."""
    from tokenwarden.worker.domain.verification import verify_token

    given = [value for value in (text, url, header) if value is not None]
    if len(given) != 1:
        fail("give exactly one of --token, --url or --header")
    try:
        candidate = (
            text
            if text is not None
            else from_url(url)
            if url is not None
            else from_header(header or "")
        )
    except ExtractError as error:
        _refused({"usable": False, "reason": "malformed", "detail": str(error)}, as_json)
    with transaction() as session:
        verdict = verify_token(session, candidate, now=clock.now(), source="cli")
    result = verdict.as_dict()
    if not verdict.usable:
        _refused(result, as_json)
    if as_json:
        echo_json(result)
        return
    who = verdict.principal
    owner = (
        f"user {who['user_id']} (role {who['role']})"
        if "user_id" in who
        else f"application {who['app_id']}"
    )
    click.echo(f"usable: {who['kind']} token {who['token_id']} of {owner} in {who['org_id']}")


def _refused(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        echo_json(result)
    else:
        detail = f" ({result['detail']})" if result.get("detail") else ""
        token_id = f" token {result['token_id']}" if result.get("token_id") else ""
        click.echo(f"refused:{token_id} {result['reason']}{detail}")
    sys.exit(EXIT_REFUSED)


@token.command()
@click.argument("token_id")
@click.option("--confirm", default=None, help="Type DELETE to confirm.")
@click.option("--actor", default=None, type=NO_TOKEN, help="Who asks (default: the login name).")
@json_option
def revoke(token_id: str, confirm: str | None, actor: str | None, as_json: bool) -> None:
    """Delete (revoke) a token: it stops working at once. Needs --confirm DELETE."""
    from tokenwarden.worker.domain.revocation import revoke_token

    if confirm != "DELETE":
        fail("revoking a token needs --confirm DELETE (exactly that word)")
    actor = actor or getpass.getuser()
    with transaction() as session:
        known = session.get(Token, token_id)
        if known is None and TOKEN_PATTERN.search(token_id):
            fail(
                "that is a token, not a token id: `tokenwarden token list` shows the ids "
                "(to revoke a token you hold, report it: tokenwarden emit "
                "token.leak_suspected --data -)"
            )
        if known is None:
            fail(f"no token with id {token_id!r}")
        revoked = revoke_token(
            session,
            token_id=token_id,
            reason="deleted",
            source="cli",
            now=clock.now(),
            actor=actor,
        )
        state = known.state if revoked is None else "revoked"
    if as_json:
        echo_json({"id": token_id, "revoked": revoked is not None, "state": state})
    elif revoked is None:
        click.echo(f"{token_id} was already {state}; nothing changed")
    else:
        click.echo(f"{token_id} revoked; it no longer works")


@token.command()
@click.argument("token_id")
@click.option(
    "--created-by", required=True, type=NO_TOKEN, help="Active member who answers for it now."
)
@click.option("--actor", default=None, type=NO_TOKEN, help="Who asks (default: the login name).")
@json_option
def reassign(token_id: str, created_by: str, actor: str | None, as_json: bool) -> None:
    """Hand an application token to another active member of its organization."""
    from tokenwarden.worker.domain.orphans import reassign as hand_over

    with transaction() as session:
        _, previous = hand_over(
            session,
            token_id=token_id,
            created_by=created_by,
            now=clock.now(),
            actor=actor or getpass.getuser(),
        )
    if as_json:
        echo_json({"id": token_id, "created_by": created_by, "previous": previous})
    else:
        click.echo(f"{token_id} now answered for by {created_by} (was {previous})")


_DURATION: Final = re.compile(r"(\d+)\s*([smhd])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str, *, option: str) -> timedelta:
    """``90s``, ``30m``, ``1h30m``, or bare seconds, as a timedelta; else a one-line failure."""
    text = value.strip().lower()
    if text.isdigit():
        return timedelta(seconds=int(text))
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        fail(f"{option}: expected a duration such as 90s, 30m or 2h, not {value!r}")
    return timedelta(seconds=sum(int(number) * _UNIT_S[unit] for number, unit in parts))


@token.command()
@click.argument("token_id")
@click.option("--overlap", default="0", help="How long the old token keeps working (at most 24h).")
@click.option("--expires-at", default=None, help="ISO 8601 expiry (default: the same lifetime).")
@click.option("--actor", default=None, type=NO_TOKEN, help="Who asks (default: the login name).")
@json_option
def rotate(
    token_id: str, overlap: str, expires_at: str | None, actor: str | None, as_json: bool
) -> None:
    """Issue a successor of a token and print it once; the old one stops after --overlap."""
    from tokenwarden.worker.domain.rotation import rotate_in
    from tokenwarden.worker.runtime.publishing import published_after_commit

    span = parse_duration(overlap, option="--overlap")
    expiry = parse_instant(expires_at, option="--expires-at") if expires_at else None

    @contextmanager
    def committed() -> Iterator[Session]:
        with published_after_commit(db.transaction(store())) as session:
            yield session

    try:
        done = rotate_in(
            committed,
            token_id,
            now=clock.now(),
            overlap=span,
            expires_at=expiry,
            source="cli",
            actor=actor or getpass.getuser(),
        )
    except Refused as refused:
        fail(refused.message)
    issued = done.successor
    if as_json:
        echo_json(
            {
                "id": issued.id,
                "token": issued.token,
                "replaces": done.predecessor_id,
                "family_id": done.family_id,
                "expires_at": issued.expires_at,
                "overlap_ends_at": done.overlap_ends_at,
            }
        )
        return
    click.echo(
        f"{issued.id} replaces {token_id}, expires {issued.expires_at.isoformat()}; "
        f"{token_id} stops at {done.overlap_ends_at.isoformat()}"
    )
    click.echo("Copy it now; it will not be shown again:")
    click.echo(issued.token)


def register(group: click.Group) -> None:
    group.add_command(token)
