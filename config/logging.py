"""structlog once, everywhere: one processor chain behind a stdlib handler on the root logger.

Our own structlog loggers and plain stdlib loggers (Celery, uvicorn, Alembic, libraries) go
through the same ``ProcessorFormatter``, so every line has the same shape: JSON off a terminal,
a readable console line on one. Anything shaped like a token is masked before it is rendered.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.tokens import TOKEN_PATTERN, mask_tokens

# Tells a reader that a token was there (and which kind) without revealing any of it, not
# even the last four characters that ``worker.tokens.hint`` shows to the owner.
# The handler's name marks it as ours, so a second call replaces it and leaves others alone.
_HANDLER_NAME: Final = "tokenwarden"
# uvicorn installs its own handlers; without them its lines reach the root handler instead.
_UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")
_PLAIN: Final = (bool, int, float, type(None))
# Every text TOKEN_PATTERN matches contains this: a substring test clears the plain text of
# nearly every field several times faster than running the pattern over it.
_MATCH_MARK: Final = "sm_"


def _mask(text: str) -> str:
    return mask_tokens(text) if _MATCH_MARK in text else text


def _redact(value: object) -> object:
    if isinstance(value, str):
        return _mask(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {_redact(key): _redact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_redact(item) for item in value)
    if isinstance(value, set | frozenset):
        return {_redact(item) for item in value}
    # Both renderers print other objects (an exception passed as a field, a model, bytes)
    # through repr(): mask that text when it holds a token, else keep the object as it is.
    text = repr(value)
    return mask_tokens(text) if TOKEN_PATTERN.search(text) else value


def redact_tokens(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Mask every token in the event, its fields (recursively, keys too) and its traceback."""
    return {_mask(key): _redact(value) for key, value in event_dict.items()}


def one_event_or_many(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """A line about one event names that event (``event_id``), not its message's ids.

    A task run binds the whole list of its message's ids (``event_ids``, up to a hundred), so
    that its own lines and Celery's name them; repeated on every line about each event of the
    message, it made those lines a hundred times longer and the worker spend most of its time
    writing them.
    """
    if "event_id" in event_dict:
        event_dict.pop("event_ids", None)
    return event_dict


def configure_logging(
    *, json: bool | None = None, level: str = "INFO", stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging to one handler on ``stream`` (stderr by default).

    ``json=None`` picks JSON unless ``stream`` is a terminal. Safe to call again: the handler
    a previous call installed is replaced, not added to.
    """
    out = sys.stderr if stream is None else stream
    use_json = not out.isatty() if json is None else json
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # Run for structlog events and foreign records alike. The traceback is formatted to text
    # here, before redaction, because a token often sits in an exception message.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        one_event_or_many,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        # Redaction sits here, the one place both kinds of record pass, right before rendering;
        # after remove_processors_meta so the raw LogRecord is gone by then.
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_tokens,
            renderer,
        ],
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
        handler.close()  # A StreamHandler leaves its stream open: the stream is the caller's.
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True

    structlog.configure(
        processors=[
            *shared,
            # structlog's stdlib logger keeps %-style args aside; format them as stdlib would.
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Caching would pin loggers to the first configuration; tests and reconfiguration
        # need every call to see the current one.
        cache_logger_on_first_use=False,
    )


def bind_task_context(**values: Any) -> None:
    """Attach ``values`` (task_id, task_name, event_id) to every line until cleared."""
    structlog.contextvars.bind_contextvars(**values)


def clear_task_context() -> None:
    structlog.contextvars.clear_contextvars()
