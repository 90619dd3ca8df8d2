"""Emailing notices: one message per notice and recipient, over SMTP.

The mail says what happened, which tokens (name, kind, organization, last four characters,
expiry; never the token), why, and what to do next, in plain text and HTML rendered from the
templates in ``templates/mail`` (Jinja2, HTML autoescaped). Its ``Message-ID`` is derived
from the notice id and the recipient, so a mail sent again after a worker died is
recognisably the same mail.

:func:`deliver` wraps one notice's sends in the outbox's email rules
(``worker.domain.mail_outbox``): lease the notice's due recipients, send over one SMTP
connection (kept open for the next notice, ``worker.runtime.smtp_connections``), record each
recipient's outcome; no transaction is open while the server talks.
A permanent (5xx) reply to a recipient fails that recipient with the reason; a temporary
(4xx) one, a refused or dropped connection or a timeout is retried with backoff and jitter.
"""

from __future__ import annotations

import hashlib
import json
import smtplib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import lru_cache
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import jinja2
import structlog
from sqlalchemy import Engine

from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain import clock, db, mail_outbox
from tokenwarden.worker.domain.models import NoticeStatus
from tokenwarden.worker.domain.outbox_delivery import (
    LEASE,
    TIMEOUT_S,
    Outcome,
    lease_for,
    timeout_for,
)
from tokenwarden.worker.runtime.smtp_connections import connection

log = structlog.get_logger(__name__)

ERROR_LENGTH: Final = 300
SMTP_PORT: Final = 25
SMTPS_PORT: Final = 465


@dataclass(frozen=True)
class MailTarget:
    """The SMTP server notices are sent through, and who they are from."""

    host: str
    port: int
    implicit_tls: bool
    sender: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    lease: timedelta = LEASE
    timeout_s: float = TIMEOUT_S

    @property
    def receiver(self) -> str:
        """The server for log lines, never its credentials."""
        return f"{'smtps' if self.implicit_tls else 'smtp'}://{self.host}:{self.port}"

    @property
    def sender_address(self) -> str:
        return parseaddr(self.sender)[1]


def target_from(settings: Settings) -> MailTarget | None:
    """The SMTP target the settings name; None when no email is sent."""
    if not settings.smtp_url or not settings.mail_from:
        return None
    parts = urlsplit(settings.smtp_url)
    implicit_tls = parts.scheme == "smtps"
    lease = lease_for(settings.redrive_after_s)
    return MailTarget(
        host=parts.hostname or "",
        port=parts.port or (SMTPS_PORT if implicit_tls else SMTP_PORT),
        implicit_tls=implicit_tls,
        sender=settings.mail_from,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        lease=lease,
        timeout_s=timeout_for(lease),
    )


# -- what the mail says --------------------------------------------------------------------

SUBJECTS: Final = {
    "token.leaked": "A leaked token was revoked",
    "member.offboarded": "Tokens of a member who left were revoked",
    "token.expiring": "Tokens expire soon",
    "token.expired": "Tokens have expired",
    "token.idle_warning": "Unused tokens will be revoked as idle",
    "token.idle_revoked": "Unused tokens were revoked as idle",
    "application_tokens.orphaned": "Application tokens lost the member who created them",
    "tokens.bulk_revoked": "Tokens were revoked all at once",
    "token.reuse_detected": "A rotated-away token was used again: its family was revoked",
}
REASONS: Final = {
    "leaked": "the token was reported as leaked, so it was revoked at once.",
    "member_removed": "their owner left the organization.",
    "user_deactivated": "their owner's account was deactivated.",
    "expired": "they reached the expiry set when they were created.",
    "idle": "they were not used for as many days as the organization allows.",
    "creator_left": (
        "the member who created them left; they keep working, so the application is not "
        "interrupted, but nobody in the organization answers for them until one is handed over."
    ),
    "bulk": "an administrator revoked every token matching a selection at once.",
    "reuse_detected": (
        "a token that had been rotated away was presented after its overlap: someone still "
        "holds a copy that should be gone, so every live token of its rotation chain was revoked."
    ),
}
DETAILS: Final = (
    ("user_id", "Member"),
    ("stated_reason", "Reason given"),
    ("actor", "Asked by"),
    ("idle_days", "Days without use that make a token idle"),
    ("source", "Reported through"),
    ("source_url", "Found at"),
    ("reporter", "Reported by"),
    ("revoked_at", "Revoked at"),
    ("revoked_from", "Revoked as idle from"),
    ("expired_at", "Expired at"),
    ("days", "Days left at most"),
    ("event_id", "Event"),
)


@lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tokenwarden.worker.runtime", "templates/mail"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


# The first line of each kind's mail: {names} are the tokens' names, {user} the member.
HEADLINES: Final = {
    "token.leaked": "The token {names} was reported as leaked and has been revoked.",
    "member.offboarded": "The personal access tokens of {user} were revoked: {names}.",
    "token.expiring": "These tokens expire soon: {names}.",
    "token.expired": "These tokens have expired: {names}.",
    "application_tokens.orphaned": "{user} left and created these application tokens: {names}.",
    "tokens.bulk_revoked": "These tokens were revoked in a break-glass revocation: {names}.",
    "token.reuse_detected": (
        "A rotated-away token was used again, and these tokens were revoked: {names}."
    ),
    "token.idle_warning": (
        "These tokens have not been used for a long time and will be revoked: {names}."
    ),
    "token.idle_revoked": (
        "These tokens were not used for a long time and have been revoked: {names}."
    ),
}


def _headline(kind: str, data: dict[str, Any]) -> str:
    tokens = data.get("tokens") or []
    names = ", ".join(str(t.get("name")) for t in tokens) or "(none)"
    shape = HEADLINES.get(kind, "A notice about these tokens ({kind}): {names}.")
    return shape.format(names=names, user=data.get("user_id"), kind=kind)


def context(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """What the templates show about a notice's body ``data``."""
    reason = data.get("reason")
    why = REASONS.get(str(reason), str(reason)) if reason else None
    if kind == "token.expiring" and why is None:
        why = "their expiry is near, and an expiry can never be extended."
    details = [(label, str(data[key])) for key, label in DETAILS if data.get(key)]
    subject = SUBJECTS.get(kind, f"tokenwarden notice: {kind}")
    orgs = sorted({str(t.get("org_id")) for t in data.get("tokens") or [] if t.get("org_id")})
    if orgs:
        subject = f"{subject} ({', '.join(orgs)})"
    return {
        "subject": subject,
        "headline": _headline(kind, data),
        "why": why,
        "details": details,
        "tokens": data.get("tokens") or [],
        "next_steps": data.get("next_steps") or "",
        "notice_id": data.get("notice_id"),
    }


def message_id(notice_id: str, address: str, sender: str) -> str:
    """The same for every attempt of one notice to one recipient."""
    digest = hashlib.sha256(address.strip().lower().encode()).hexdigest()[:16]
    domain = parseaddr(sender)[1].rpartition("@")[2] or "tokenwarden.invalid"
    return f"<{notice_id}.{digest}@{domain}>"


def build(
    target: MailTarget, *, notice_id: str, body: dict[str, Any], address: str, now: datetime
) -> EmailMessage:
    """The mail of one notice to one recipient."""
    shown = context(str(body.get("type")), body.get("data") or {})
    shown["notice_id"] = notice_id
    templates = _templates()
    message = EmailMessage()
    message["Subject"] = shown["subject"]
    message["From"] = target.sender
    message["To"] = Address(addr_spec=address)
    message["Date"] = format_datetime(now)
    message["Message-ID"] = message_id(notice_id, address, target.sender)
    message["Auto-Submitted"] = "auto-generated"
    message["X-Tokenwarden-Notice"] = notice_id
    message.set_content(templates.get_template("notice.txt").render(shown))
    message.add_alternative(templates.get_template("notice.html").render(shown), subtype="html")
    return message


# -- sending -------------------------------------------------------------------------------


def outcome_of(error: Exception, target: MailTarget) -> Outcome:
    """What an SMTP error means for a recipient: a permanent 5xx reply fails it, anything
    else (4xx, a refused or dropped connection, a timeout, a failed login) is retried."""
    code: int | None = None
    raw: bytes | str = b""
    if isinstance(error, smtplib.SMTPRecipientsRefused) and error.recipients:
        code, raw = next(iter(error.recipients.values()))
    elif isinstance(error, smtplib.SMTPResponseException):
        code, raw = error.smtp_code, error.smtp_error
    reply = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    if code is not None:
        reason = f"SMTP {code} {' '.join(reply.split())}".strip()
    else:
        reason = f"{type(error).__name__}: {error}"
    if target.password:
        reason = reason.replace(target.password, "***")
    reason = reason[:ERROR_LENGTH]
    login = isinstance(error, smtplib.SMTPAuthenticationError)
    if code is not None and 500 <= code < 600 and not login:
        return Outcome(NoticeStatus.FAILED, reason)
    return Outcome(NoticeStatus.PENDING, reason)


# Errors a single recipient's send raises with the connection still usable.
_PER_RECIPIENT: Final = (
    smtplib.SMTPRecipientsRefused,
    smtplib.SMTPSenderRefused,
    smtplib.SMTPDataError,
)


def send(
    target: MailTarget, leased: mail_outbox.LeasedEmails, *, now: datetime
) -> dict[str, Outcome]:
    """Send the notice to each leased recipient over one connection; each one's outcome.

    Never raises for what the network or the server does: a connection that fails leaves
    every recipient not yet answered pending, with the reason.
    """
    body = _parsed(leased.body)
    outcomes: dict[str, Outcome] = {}
    try:
        with connection(target) as smtp:
            for address, _user_id in leased.recipients:
                try:
                    mail = build(
                        target, notice_id=leased.notice_id, body=body, address=address, now=now
                    )
                except (ValueError, TypeError, MessageError) as error:
                    outcomes[address] = Outcome(
                        NoticeStatus.FAILED, f"not an address a mail can go to: {error}"[:300]
                    )
                    continue
                try:
                    smtp.send_message(mail, from_addr=target.sender_address, to_addrs=[address])
                except _PER_RECIPIENT as error:
                    outcomes[address] = outcome_of(error, target)
                else:
                    outcomes[address] = Outcome(NoticeStatus.SENT)
    except (smtplib.SMTPException, OSError) as error:
        failed = outcome_of(error, target)
        cut = Outcome(NoticeStatus.PENDING, failed.error)  # the server, not the recipient
        for address, _user_id in leased.recipients:
            outcomes.setdefault(address, cut)
    return outcomes


def _parsed(body: str) -> dict[str, Any]:
    parsed = json.loads(body)
    return parsed if isinstance(parsed, dict) else {}


@dataclass(frozen=True)
class MailAttempt:
    """What one attempt at a notice's emails left behind."""

    notice_id: str
    outcomes: dict[str, str] = field(default_factory=dict)  # address -> status now
    retry_in_s: float | None = None


def deliver(engine: Engine, notice_id: str, *, target: MailTarget) -> MailAttempt:
    """Lease, send and record a notice's due emails, each database step in its own short
    transaction; nothing is leased when none is due (the webhook's retry, a duplicate)."""
    with db.transaction(engine) as session:
        leased = mail_outbox.lease_emails(
            session, notice_id, now=clock.now(), duration=target.lease
        )
    if leased is None:
        return MailAttempt(notice_id)
    outcomes = send(target, leased, now=clock.now())
    statuses: dict[str, str] = {}
    delays: list[float] = []
    with (
        structlog.contextvars.bound_contextvars(smtp=target.receiver),
        db.transaction(engine) as session,
    ):
        now = clock.now()
        for address, outcome in outcomes.items():
            delay = mail_outbox.record_email(
                session, notice_id, address, outcome, now=now, leased_until=leased.until
            )
            statuses[address] = outcome.status.value if delay is None else "pending"
            if delay is not None:
                delays.append(delay)
    return MailAttempt(notice_id, statuses, min(delays) if delays else None)
