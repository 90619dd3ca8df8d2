"""A real SMTP server on loopback (aiosmtpd) that answers from a script, for tests and benches.

Each DATA is answered from ``script`` in order ("250" once it is empty): an SMTP reply such
as ``"421 4.3.2 try later"``, or ``"drop"`` to close the connection before answering (a
server that dies mid-DATA). Addresses in ``refuse`` are refused at RCPT with a 550.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from tokenwarden.worker.ops.supervisor import free_port
from tokenwarden.worker.runtime.smtp_connections import close_kept


@dataclass
class Delivered:
    envelope_to: list[str]
    message: EmailMessage
    at: float
    # The client's port: mails over one kept connection share it.
    peer_port: int = 0

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


@dataclass
class Handler:
    script: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    delivered: list[Delivered] = field(default_factory=list)
    # Every DATA that arrived, answered or not: (recipients, reply).
    attempts: list[tuple[list[str], str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # "hold": the mail is taken, then the reply waits until ``release`` is set.
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 <" + address + ">: no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        with self.lock:
            reply = self.script.pop(0) if self.script else "250"
            self.attempts.append((list(envelope.rcpt_tos), reply))
        if reply == "drop":
            assert server.transport is not None
            server.transport.close()
            return "250 OK"  # never reaches the client
        if reply not in ("250", "hold"):
            return reply
        content = envelope.original_content or envelope.content
        assert isinstance(content, bytes)
        message = message_from_bytes(content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.delivered.append(
                Delivered(list(envelope.rcpt_tos), message, time.monotonic(), _port(session))
            )
        if reply == "hold":
            self.arrived.set()
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        return "250 OK queued"


def _port(session: Session) -> int:
    peer: Any = session.peer
    return int(peer[1]) if isinstance(peer, tuple) else 0


class MailServer:
    """An SMTP server on a free loopback port; ``tls`` offers STARTTLS with that context, or
    with ``implicit`` speaks TLS from the first byte (smtps)."""

    def __init__(
        self, *, tls: Any = None, login: tuple[str, str] | None = None, implicit: bool = False
    ) -> None:
        self.handler = Handler()
        self.port = free_port()
        self.scheme = "smtps" if implicit else "smtp"
        kwargs: dict[str, Any] = {}
        if tls is not None and implicit:
            kwargs.update(ssl_context=tls)
        elif tls is not None:
            kwargs.update(tls_context=tls, require_starttls=True)
        if login is not None:
            kwargs.update(authenticator=_Authenticator(*login), auth_required=True)
            if tls is None:
                kwargs.update(auth_require_tls=False)
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, ready_timeout=10, **kwargs
        )

    def url(self, userinfo: str = "") -> str:
        return f"{self.scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    @property
    def delivered(self) -> list[Delivered]:
        with self.handler.lock:
            return list(self.handler.delivered)

    def __enter__(self) -> MailServer:
        self.controller.start()
        return self

    def __exit__(self, *_: object) -> None:
        # This process keeps its last connection open for the next notice: a server that
        # stops under it would leave its side of the socket unclosed.
        close_kept()
        self.controller.stop()


@dataclass
class _Authenticator:
    user: str
    password: str

    def __call__(
        self, server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == self.user.encode()
            and data.password == self.password.encode()
        )
        return AuthResult(success=ok)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key, written into ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
