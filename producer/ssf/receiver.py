"""What the SSF route shares: the transmitters' keys, the outcome counter, and the look-up and
audit of a verified SET in the store (run on the thread pool)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Engine, select

from tokenwarden.config.settings import Settings
from tokenwarden.producer.ssf.keys import TransmitterKeys
from tokenwarden.producer.ssf.signals import Outcome, resolve, source_of
from tokenwarden.producer.ssf.verify import VerifiedSet
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.audit import record
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.models import AuditEntry

OUTCOMES: Final = ("accepted", "ignored", "unknown_subject")
# The audit action of a SET acknowledged without an event.
ACTIONS: Final = {"ignored": "ssf_ignored", "unknown_subject": "ssf_unknown_subject"}


class SsfReceiver:
    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.transmitters = {t.issuer: TransmitterKeys(t) for t in settings.ssf_transmitters}
        self.outcomes = Counter(
            "tokenwarden_ssf_events",
            "Security Event Tokens received and verified, by outcome (accepted: an inbox "
            "event; ignored: an event type we do not act on; unknown_subject).",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.outcomes.labels(outcome)

    def settle(self, engine: Engine, verified: VerifiedSet) -> Outcome:
        """The event ``verified`` becomes; a SET without one is audited once per ``jti``."""
        with transaction(engine) as session:
            outcome = resolve(session, verified)
            if outcome.event is not None:
                return outcome
            action = ACTIONS[outcome.outcome]
            source = source_of(verified.issuer)
            seen = session.scalar(
                select(AuditEntry.id)
                .where(
                    AuditEntry.action == action,
                    AuditEntry.event_id == verified.jti,
                    AuditEntry.source == source,
                )
                .limit(1)
            )
            if seen is None:
                fmt = (verified.subject or {}).get("format")
                record(
                    session,
                    action=action,
                    reason=outcome.outcome,
                    source=source,
                    at=clock.now(),
                    actor="ssf",
                    event_id=verified.jti,
                    detail={
                        "event_type": verified.event_type[:500],
                        "subject_format": fmt if isinstance(fmt, str) else None,
                    },
                )
            return outcome
