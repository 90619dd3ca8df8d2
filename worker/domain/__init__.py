"""The domain: tokens, members, events and the rules that act on them, over SQLAlchemy.

It holds the models, the token format, issuing and verification, memberships and offboarding,
revocation and removals, the audit trail, the inbox and the outbox rules, the event schemas and
their handlers, the clock, the database helpers and the expiry sweep with its reminders.

It must not import Celery, kombu, httpx, FastAPI, Starlette, standardwebhooks or uvicorn, nor
``tasks``, ``producer``, ``worker.runtime``, ``worker.cli`` or ``worker.ops``: the rules here run
the same under any runtime (checked by import-linter, see ``[tool.importlinter]``).
"""
