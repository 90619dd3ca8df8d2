"""When each token was last used: written in batches, read by ``token list``.

Rows live in ``token_usage``, apart from ``tokens``, so recording a use never holds a lock that
a revocation waits for. Writers coalesce uses (the API keeps at most one a minute per token and
writes them every few seconds in one statement); a time never moves backwards.

Imports nothing but the domain and SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import Token, TokenUsage

# Ids bound in one statement, well under SQLite's limit on parameters.
CHUNK: Final = 5000


def record_uses(session: Session, used: Mapping[str, datetime]) -> int:
    """Upsert the last use of each token in ``used`` (id -> time); return the rows written.

    Ids of tokens that no longer exist (deleted by the retention meanwhile) are skipped.
    """
    if not used:
        return 0
    existing = session.scalars(select(Token.id).where(Token.id.in_(list(used)))).all()
    rows = [{"token_id": token_id, "last_used_at": used[token_id]} for token_id in existing]
    if not rows:
        return 0
    if session.get_bind().dialect.name == "postgresql":
        statement = db.insert_for(session, TokenUsage).values(rows)
        newest = func.greatest(TokenUsage.last_used_at, statement.excluded.last_used_at)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[TokenUsage.token_id], set_={"last_used_at": newest}
            )
        )
    else:
        lite = db.insert_for(session, TokenUsage).values(rows)
        session.execute(
            lite.on_conflict_do_update(
                index_elements=[TokenUsage.token_id],
                set_={
                    "last_used_at": func.max(TokenUsage.last_used_at, lite.excluded.last_used_at)
                },
            )
        )
    return len(rows)


def last_used(session: Session, token_ids: Collection[str]) -> dict[str, datetime]:
    """The last recorded use of each of ``token_ids`` that has one."""
    ids = list(token_ids)
    found: dict[str, datetime] = {}
    for start in range(0, len(ids), CHUNK):
        rows = session.execute(
            select(TokenUsage.token_id, TokenUsage.last_used_at).where(
                TokenUsage.token_id.in_(ids[start : start + CHUNK])
            )
        ).all()
        found.update((token_id, used_at) for token_id, used_at in rows)
    return found
