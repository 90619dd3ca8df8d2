"""SMTP connections for emailing notices: TLS as the URL says, and one kept open between
notices per worker process.

A new connection costs a greeting, ``EHLO`` (and ``STARTTLS`` with a second ``EHLO``, and a
login) before the first mail: more than the mail itself with a near server. So a connection
that ended a notice cleanly is kept for the next one, for at most :data:`KEEP_S` seconds of
idleness, checked with a ``NOOP`` when it has been idle a while (servers close idle
connections), and never shared across a fork or by two threads at once. A connection that
failed is closed, never kept.
"""

from __future__ import annotations

import atexit
import os
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from tokenwarden.worker.runtime.mail import MailTarget

# An idle connection older than this is closed rather than used (servers drop idle clients
# after a minute or more; RFC 5321 asks them to wait at least five).
KEEP_S: Final = 30.0
# An idle connection older than this is checked with a NOOP before it carries a mail.
CHECK_AFTER_S: Final = 5.0


def tls_context() -> ssl.SSLContext:
    """The system's trusted certificates, verified host names; made once per process.

    Loading the trusted certificates takes tens of milliseconds, more than the whole SMTP
    exchange with a near server. ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` name others, as usual.
    """
    return _tls_context(
        os.getpid(), os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    )


@lru_cache(maxsize=4)
def _tls_context(_pid: int, _file: str | None, _dir: str | None) -> ssl.SSLContext:
    return ssl.create_default_context()


@lru_cache(maxsize=1)
def local_hostname() -> str:
    """The name this host gives in EHLO, looked up once: smtplib would ask DNS per connection."""
    return socket.getfqdn()


def open_connection(target: MailTarget) -> smtplib.SMTP:
    """A new connection: TLS from the start (smtps), or STARTTLS when the server offers it."""
    smtp: smtplib.SMTP
    if target.implicit_tls:
        smtp = smtplib.SMTP_SSL(
            target.host,
            target.port,
            local_hostname=local_hostname(),
            timeout=target.timeout_s,
            context=tls_context(),
        )
    else:
        smtp = smtplib.SMTP(
            target.host, target.port, local_hostname=local_hostname(), timeout=target.timeout_s
        )
    try:
        smtp.ehlo()
        if not target.implicit_tls and smtp.has_extn("starttls"):
            smtp.starttls(context=tls_context())
            smtp.ehlo()
        if target.username is not None:
            smtp.login(target.username, target.password or "")
    except BaseException:
        smtp.close()
        raise
    return smtp


def _end(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


class _Kept:
    """At most one idle connection of this process, with its target and when it was freed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: tuple[MailTarget, smtplib.SMTP, float] | None = None
        self._pid = os.getpid()

    def take(self, target: MailTarget) -> smtplib.SMTP | None:
        with self._lock:
            idle, self._idle = self._idle, None
            if self._pid != os.getpid():
                self._pid, idle = os.getpid(), None  # the parent's: never used here
        if idle is None:
            return None
        kept_for, smtp, freed = idle
        idle_s = time.monotonic() - freed
        if kept_for != target or idle_s > KEEP_S or smtp.sock is None:
            _end(smtp)
            return None
        if idle_s > CHECK_AFTER_S:
            try:
                if smtp.noop()[0] != 250:
                    raise smtplib.SMTPServerDisconnected("NOOP refused")
            except (smtplib.SMTPException, OSError):
                smtp.close()
                return None
        return smtp

    def give_back(self, target: MailTarget, smtp: smtplib.SMTP) -> None:
        if smtp.sock is None:  # the server hung up (a 421 closes it too)
            return
        with self._lock:
            previous, self._idle = self._idle, (target, smtp, time.monotonic())
            mine = self._pid == os.getpid()
        if previous is not None and mine:
            _end(previous[1])

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, None
            mine = self._pid == os.getpid()
        if idle is not None and mine:
            _end(idle[1])

    def forget_after_fork(self) -> None:
        # The parent's socket stays the parent's; the lock may have been held at the fork.
        self._lock = threading.Lock()
        self._idle = None
        self._pid = os.getpid()


_KEPT: Final = _Kept()
os.register_at_fork(after_in_child=_KEPT.forget_after_fork)
atexit.register(_KEPT.close)


@contextmanager
def connection(target: MailTarget) -> Iterator[smtplib.SMTP]:
    """A connection for one notice's mails: the one kept from the last notice when it is
    still good, else a new one. Kept again afterwards unless it failed."""
    smtp = _KEPT.take(target) or open_connection(target)
    try:
        yield smtp
    except BaseException:
        smtp.close()
        raise
    _KEPT.give_back(target, smtp)


def close_kept() -> None:
    """Close this process's idle connection (a worker process that stops)."""
    _KEPT.close()
