"""The closed sets of values the token store's columns hold: roles, token kinds, and the
statuses of inbox events and notices.

Plain enums, apart from the ORM models (worker.domain.models re-exports them), so that a
command that only names them (``tokenwarden emit``, the ``--status`` options) starts without
loading SQLAlchemy's ORM. It must import nothing but the standard library.
"""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    ADMIN = "admin"
    USER = "user"


class TokenKind(enum.StrEnum):
    PERSONAL = "personal"
    APPLICATION = "application"


class EventStatus(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"


class NoticeStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
