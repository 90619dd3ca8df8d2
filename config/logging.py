"""structlog once, everywhere: one processor chain behind a stdlib handler on the root logger.

Our own structlog loggers and plain stdlib loggers (Celery, uvicorn, Alembic, libraries) go
through the same ``ProcessorFormatter``, so every line has the same shape: JSON off a terminal,
a readable console line on one. Anything shaped like a token is masked before it is rendered.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Final, TextIO, cast

import structlog
from structlog.stdlib import BoundLogger as _StdlibBoundLogger
from structlog.typing import EventDict, Processor, WrappedLogger

from tokenwarden.config.redaction import TOKEN_PATTERN, mask_tokens

# Tells a reader that a token was there (and which kind) without revealing any of it, not
# even the last four characters that ``worker.domain.tokens.hint`` shows to the owner.
# HTTP clients announce every request with its full URL, a webhook's secret query or
# credentials included; what they have to say that matters comes at WARNING or above.
_QUIET_LOGGERS: Final = {"httpx": logging.WARNING, "httpcore": logging.WARNING}
# A URL's user information, up to its last '@' (a password may hold one unencoded), and its
# query, up to what ends a URL in a message.
_URL_USERINFO: Final = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)([^\s/?#'\"<>]*)@")
_URL_QUERY: Final = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s?#]*\?)([^\s#'\"<>]*)")
_QUERY_SEPARATORS: Final = ("&", ";")
_QUERY_SEPARATOR: Final = re.compile(r"([&;])")
# The handler's name marks it as ours, so a second call replaces it and leaves others alone.
_HANDLER_NAME: Final = "tokenwarden"
# uvicorn installs its own handlers; without them its lines reach the root handler instead.
_UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")
_PLAIN: Final = (bool, int, float, type(None))
# The exact types of nearly every field: nothing in them to mask or to walk.
_SCALARS: Final = frozenset(_PLAIN)
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


def _masked_userinfo(match: re.Match[str]) -> str:
    # A user beside a password is a name worth keeping; a user alone is often the secret
    # itself (``https://KEY@hooks.example``).
    user, colon, _ = match.group(2).partition(":")
    return f"{match.group(1)}{user}:***@" if colon else f"{match.group(1)}***@"


def _masked_query(match: re.Match[str]) -> str:
    # Each value goes, names stay: ``?secret=***&team=***``; a bare value is all value.
    parts = _QUERY_SEPARATOR.split(match.group(2))
    return match.group(1) + "".join(
        part
        if not part or part in _QUERY_SEPARATORS
        else (part.partition("=")[0] + "=***" if "=" in part else "***")
        for part in parts
    )


def mask_url_secrets(text: str) -> str:
    """``text`` with every URL's user information and query values masked.

    ``https://hooks:***@hooks.example/n?secret=***``; a user alone is masked whole
    (``https://***@hooks.example/``), and so is a query value without a name (``?***``).
    """
    if "://" not in text:
        return text
    # Most URLs in a line have neither (a receiver, a broker already masked): skip the scans.
    if "@" in text:
        text = _URL_USERINFO.sub(_masked_userinfo, text)
    return _URL_QUERY.sub(_masked_query, text) if "?" in text else text


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Mask every token in the event, its fields (recursively, keys too) and its traceback;
    and every URL's credentials and query values in its message, text fields and traceback.

    A library's own line, or an error it raised, can quote a URL whole (a webhook's
    ``?secret=…``), and an error's text often becomes a field of ours (``error=``). Our own
    lines name a webhook receiver by scheme, host and port only.
    """
    # The formatter hands over its own copy, so fields are replaced in place; a plain string
    # or number is settled here without a call. Both kinds of masking are idempotent.
    for key, value in event_dict.items():
        if _MATCH_MARK in key:
            # A key cannot be replaced in place: build the event anew.
            rebuilt = {_mask(name): _redact(field) for name, field in event_dict.items()}
            for name, field in rebuilt.items():
                if isinstance(field, str):
                    rebuilt[name] = mask_url_secrets(field)
            return rebuilt
        kind = type(value)
        if kind is str:
            text = mask_tokens(value) if _MATCH_MARK in value else value
            if "://" in text:
                text = mask_url_secrets(text)
            if text is not value:
                event_dict[key] = text
        elif kind not in _SCALARS:
            event_dict[key] = _redact(value)
    return event_dict


# The second a line was stamped in, and that second as ISO text: lines share it.
_clock: tuple[int, str] = (-1, "")


def add_timestamp(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """``timestamp``: the time in UTC as ISO 8601 with a ``Z``, as ``TimeStamper`` writes it.

    Formatting a datetime took a twentieth of a line; only the microseconds change from one
    line to the next, so the rest is formatted once a second.
    """
    global _clock  # noqa: PLW0603
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    clock = _clock
    if clock[0] != second:
        clock = _clock = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    # isoformat() leaves out a zero fraction, so the same instant reads the same in both.
    event_dict["timestamp"] = f"{clock[1]}.{micro:06d}Z" if micro else f"{clock[1]}Z"
    return event_dict


@functools.cache
def _json_encoder(default: Callable[[Any], Any]) -> json.JSONEncoder:
    return json.JSONEncoder(default=default)


def _json_dumps(obj: Any, *, default: Callable[[Any], Any]) -> str:
    """``json.dumps`` as ``JSONRenderer`` calls it, minus building an encoder for every line."""
    return _json_encoder(default).encode(obj)


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


def _dropped(*args: Any, **kwargs: Any) -> None:
    return None


class _UnlessFiltered:
    """A level method of ``_LevelFilteringLogger``, checked when it is looked up.

    The check runs in the attribute look-up, not in a wrapper around the call, so the call
    itself goes straight to structlog: a frame of ours in between would be the caller that
    stdlib's ``findCaller`` names on the record (``funcName``, ``lineno``).
    """

    def __init__(self, method: Callable[..., Any], level: int) -> None:
        self._method = method
        self._level = level

    def __get__(self, logger: _LevelFilteringLogger | None, owner: type) -> Callable[..., Any]:
        if logger is None:
            return self._method
        if logger._logger.isEnabledFor(self._level) or not _ends_in_stdlib(logger._processors):
            return cast(Callable[..., Any], self._method.__get__(logger, owner))
        return _dropped


def _ends_in_stdlib(processors: Iterable[Processor]) -> bool:
    # Only a chain that hands its events to stdlib is bound by stdlib's level; another one,
    # such as structlog.testing.capture_logs() puts in place, sees every call.
    return (
        isinstance(processors, list | tuple)
        and bool(processors)
        and processors[-1] is structlog.stdlib.ProcessorFormatter.wrap_for_formatter
    )


class _LevelFilteringLogger(_StdlibBoundLogger):
    """Drops a call below its stdlib logger's level before the processor chain runs.

    The API and the worker leave debug calls in hot paths; without this check each one would
    merge the context, stamp the time and format its fields only for stdlib to discard it.
    ``isEnabledFor`` is stdlib's own gate (levels and ``logging.disable``), so nothing it lets
    through is dropped here. ``log(level, ...)`` is left to stdlib.
    """

    debug = _UnlessFiltered(_StdlibBoundLogger.debug, logging.DEBUG)
    info = _UnlessFiltered(_StdlibBoundLogger.info, logging.INFO)
    warning = _UnlessFiltered(_StdlibBoundLogger.warning, logging.WARNING)
    warn = _UnlessFiltered(_StdlibBoundLogger.warn, logging.WARNING)
    error = _UnlessFiltered(_StdlibBoundLogger.error, logging.ERROR)
    exception = _UnlessFiltered(_StdlibBoundLogger.exception, logging.ERROR)
    critical = _UnlessFiltered(_StdlibBoundLogger.critical, logging.CRITICAL)
    fatal = _UnlessFiltered(_StdlibBoundLogger.fatal, logging.CRITICAL)


class _LoggerFactory(structlog.stdlib.LoggerFactory):
    """``LoggerFactory`` that finds an existing named logger without taking logging's lock.

    It runs on every call (loggers are not cached); ``logging.getLogger`` locks the module
    for a dictionary look-up.
    """

    def __call__(self, *args: Any) -> logging.Logger:
        if args:
            logger = logging.Logger.manager.loggerDict.get(args[0])
            if isinstance(logger, logging.Logger):
                return logger
        return super().__call__(*args)


# The re-drives run every few seconds and almost always find nothing: Celery's lines about
# sending, receiving and finishing them are dropped (at INFO and below); the re-drive logs
# itself only when it republishes something.
_ROUTINE_LOGGERS: Final = frozenset({"celery.beat", "celery.worker.strategy", "celery.app.trace"})


def _not_routine(record: logging.LogRecord) -> bool:
    if record.levelno > logging.INFO or record.name not in _ROUTINE_LOGGERS:
        return True
    # Both re-drive tasks' names (config/celery.py) start so; config.celery is not imported
    # here, as it would bring Celery into every process that logs.
    return "tokenwarden.redrive_" not in record.getMessage()


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
        structlog.processors.JSONRenderer(serializer=_json_dumps)
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
        add_timestamp,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        # Redaction sits here, the one place both kinds of record pass, right before rendering;
        # after remove_processors_meta so the raw LogRecord is gone by then.
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_secrets,
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
    handler.addFilter(_not_routine)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, quiet in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet)
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
        # A nameless get_logger() is named after its caller's module, not ours.
        logger_factory=_LoggerFactory(ignore_frame_names=[__name__]),
        wrapper_class=_LevelFilteringLogger,
        # Caching would pin loggers to the first configuration; tests and reconfiguration
        # need every call to see the current one.
        cache_logger_on_first_use=False,
    )


def bind_task_context(**values: Any) -> None:
    """Attach ``values`` (task_id, task_name, event_id) to every line until cleared."""
    structlog.contextvars.bind_contextvars(**values)


def clear_task_context() -> None:
    structlog.contextvars.clear_contextvars()
