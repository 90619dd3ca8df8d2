"""What tells an API process's cache of answers that something was revoked.

- **Postgres**: triggers (migrations/versions/0008_token_last_use.py) send
  ``NOTIFY tokenwarden_revocations`` in the very transaction that revokes a token, ends a
  membership or changes a role, by whatever path. :class:`PostgresFeed` keeps one connection
  of its own, in a thread of its own, listening: a notice empties the cache the moment it
  arrives (Postgres delivers it at the commit). The cache is trusted only while that
  connection is up: lost, it is emptied and bypassed (every check reads the store) until
  the feed listens again, so an answer is never served on a stale cache. A connection that
  dies silently (no reset ever arrives), or a listener thread that is not scheduled in time,
  is caught by a ping every :data:`PING_EVERY_S`: the cache is used only within
  :data:`LEASE_S` of the last answered one, with every notice received before it taken.
- **SQLite** (one machine): :class:`SqliteFeed` asks ``PRAGMA data_version`` on a
  connection of its own before each use of the cache; the number changes whenever another
  connection, in any process, commits, and the cache is then emptied. That is a few
  microseconds per check and no delay at all; it also empties the cache on commits that
  revoke nothing (events arriving), which costs only look-ups.

Must not import the tasks.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Final, Protocol

import psycopg
import structlog
from sqlalchemy.engine import make_url

from tokenwarden.config.redaction import first_line
from tokenwarden.config.settings import without_password
from tokenwarden.producer.token_check import AnswerCache

log = structlog.get_logger(__name__)

CHANNEL: Final = "tokenwarden_revocations"
# How long the listener waits for a notice before it checks its connection with a query ...
PING_EVERY_S: Final = 0.03
# ... and how long a successful check vouches for the cache: a revocation is in no answer
# served from it later than this after its commit, whatever happens to the connection (gone
# silent with no reset from the network) or to the listener's thread (not scheduled in time
# on a loaded machine): the cache is then bypassed, and every check reads the store.
LEASE_S: Final = 0.1
APPLICATION_NAME: Final = "tokenwarden-revocation-feed"
RETRY_FIRST_S: Final = 0.5
RETRY_MAX_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 5


class Feed(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


def feed_for(database_url: str, cache: AnswerCache) -> Feed:
    """The feed that fits the store at ``database_url``."""
    if make_url(database_url).get_backend_name() == "sqlite":
        return SqliteFeed(database_url, cache)
    return PostgresFeed(database_url, cache)


class PostgresFeed:
    """``LISTEN`` on a dedicated connection; empties (or distrusts) ``cache`` as it must."""

    def __init__(self, database_url: str, cache: AnswerCache) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._shown = without_password(url.render_as_string(hide_password=True))
        self._cache = cache
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="revocation-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # The listener looks at the stop flag at least every PING_EVERY_S.
            self._thread.join(timeout=PING_EVERY_S + CONNECT_TIMEOUT_S)
        self._cache.trust(False)

    def _run(self) -> None:
        delay = RETRY_FIRST_S
        while not self._stop.is_set():
            try:
                self._listen()
                delay = RETRY_FIRST_S
            except Exception as error:
                was_listening = self.listening.is_set()
                self.listening.clear()
                self._cache.trust(False)
                if self._stop.is_set():
                    return
                (log.warning if was_listening else log.info)(
                    "revocations.feed_lost",
                    database=self._shown,
                    error=first_line(error, typed=True),
                    retry_in_s=delay,
                )
                self._stop.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    def _listen(self) -> None:
        with psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=APPLICATION_NAME,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
        ) as connection:
            connection.execute(f"LISTEN {CHANNEL}")
            # Anything revoked before the LISTEN is in no answer cached from now on.
            self._cache.trust(True)
            self._cache.renew(time.monotonic() + LEASE_S)
            self.listening.set()
            log.info("revocations.listening", database=self._shown)
            while not self._stop.is_set():
                for _ in connection.notifies(timeout=PING_EVERY_S):
                    self._cache.invalidate()
                asked = time.monotonic()
                connection.execute("SELECT 1")
                # Every notice of a commit before the ping's answer came before that answer
                # (psycopg keeps it): taken now, so the lease never vouches for an unread one.
                for _ in connection.notifies(timeout=0):
                    self._cache.invalidate()
                self._cache.renew(asked + LEASE_S)


class SqliteFeed:
    """``PRAGMA data_version`` before each use of ``cache``: any other commit empties it."""

    def __init__(self, database_url: str, cache: AnswerCache) -> None:
        self._path = make_url(database_url).database or ""
        self._cache = cache
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._version: int | None = None

    def start(self) -> None:
        self._cache.refresh = self.refresh
        self._cache.trust(bool(self._path) and self._path != ":memory:")

    def stop(self) -> None:
        self._cache.trust(False)
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def refresh(self) -> None:
        if not self._cache.trusted:
            return
        with self._lock:
            try:
                if self._connection is None:
                    self._connection = sqlite3.connect(
                        self._path, check_same_thread=False, isolation_level=None, timeout=1
                    )
                row = self._connection.execute("PRAGMA data_version").fetchone()
            except sqlite3.Error as error:
                log.warning("revocations.check_failed", error=first_line(error, typed=True))
                self._version = None
                self._cache.invalidate()
                return
            version = int(row[0])
            if version != self._version:
                self._version = version
                self._cache.invalidate()
