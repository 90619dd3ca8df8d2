"""What an operator sees in the logs: one JSON shape for every logger, and no tokens in it."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from tokenwarden.config.logging import bind_task_context, clear_task_context, configure_logging
from tokenwarden.worker.domain.models import TokenKind
from tokenwarden.worker.domain.tokens import generate

UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    uvicorn = {
        name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
        for name in UVICORN
    }
    config = structlog.get_config()
    yield
    clear_task_context()
    # Only our handler: pytest adds and removes its own capture handlers around each phase.
    for handler in [h for h in root.handlers if h.get_name() == "tokenwarden"]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler.get_name() == "tokenwarden" and handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    for name, (old_handlers, propagate) in uvicorn.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = old_handlers
        logger.propagate = propagate
    structlog.configure(**config)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def configured(**kwargs: Any) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(stream=stream, **kwargs)
    return stream


def assert_masked(output: str, token: str) -> None:
    assert token not in output
    assert token[7:] not in output
    assert token[:7] + "***" in output


def test_json_line_has_event_level_timestamp_fields_and_task_context() -> None:
    stream = configured()  # a StringIO is not a terminal, so JSON without asking
    log = structlog.get_logger("tokenwarden.worker.domain.revocation")

    bind_task_context(task_id="t-1", task_name="tasks.revoke", event_id="e-9")
    log.info("token revoked", token_id=42, reason="leaked")
    clear_task_context()
    log.info("sweep finished")

    first, second = json_lines(stream)
    assert first["event"] == "token revoked"
    assert first["level"] == "info"
    assert first["logger"] == "tokenwarden.worker.domain.revocation"
    assert (first["token_id"], first["reason"]) == (42, "leaked")
    assert (first["task_id"], first["task_name"], first["event_id"]) == (
        "t-1",
        "tasks.revoke",
        "e-9",
    )
    stamp = datetime.fromisoformat(first["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)
    assert second["event"] == "sweep finished"
    assert not {"task_id", "task_name", "event_id"} & second.keys()


def test_a_line_about_one_event_leaves_out_the_ids_of_the_whole_message() -> None:
    stream = configured(json=True)
    log = structlog.get_logger("tokenwarden.worker.domain.handlers")
    ids = [f"evt-{number}" for number in range(100)]

    with structlog.contextvars.bound_contextvars(task_id="t-3", event_ids=ids):
        with structlog.contextvars.bound_contextvars(event_id="evt-7"):
            log.info("event.applied", revoked=5)
        log.info("member.removed", event_id="evt-8", revoked=5)
        log.info("events.processed", done=100)
        logging.getLogger("celery.app.trace").info("Task succeeded")

    applied, removed, processed, succeeded = json_lines(stream)
    assert (applied["event_id"], applied["task_id"]) == ("evt-7", "t-3")
    assert (removed["event_id"], removed["task_id"]) == ("evt-8", "t-3")
    assert "event_ids" not in applied
    assert "event_ids" not in removed
    assert processed["event_ids"] == succeeded["event_ids"] == ids


def test_stdlib_records_come_out_in_the_same_shape() -> None:
    stream = configured(json=True)
    bind_task_context(task_id="t-2")

    logging.getLogger("celery.worker").warning("lost connection to broker, retrying")

    (line,) = json_lines(stream)
    assert line["event"] == "lost connection to broker, retrying"
    assert line["level"] == "warning"
    assert line["logger"] == "celery.worker"
    assert line["task_id"] == "t-2"
    assert datetime.fromisoformat(line["timestamp"]).utcoffset() == timedelta(0)


def test_level_filters_both_kinds_of_logger() -> None:
    stream = configured(json=True, level="warning")

    structlog.get_logger("worker").info("quiet")
    logging.getLogger("alembic.runtime").info("quiet too")
    structlog.get_logger("worker").warning("loud")

    assert [line["event"] for line in json_lines(stream)] == ["loud"]


def test_calls_below_the_level_write_nothing_not_even_a_masked_token() -> None:
    stream = configured(json=True, level="info")
    token = generate(TokenKind.PERSONAL)
    log = structlog.get_logger("tokenwarden.producer.api")

    log.debug(f"issued {token}", token=token, ids=[token])
    log.debug("issued %s", token)
    logging.getLogger("celery.worker").debug("got %s", token)

    assert stream.getvalue() == ""


def test_a_logger_obtained_before_reconfiguring_follows_the_new_level() -> None:
    log = structlog.get_logger("tokenwarden.worker.domain.handlers")
    quiet = configured(json=True, level="warning")
    log.info("dropped")
    loud = configured(json=True, level="debug")
    log.debug("kept")
    configured(json=True, level="info")
    log.debug("dropped again")

    assert quiet.getvalue() == ""
    assert [line["event"] for line in json_lines(loud)] == ["kept"]


def test_capture_logs_still_sees_calls_below_the_level() -> None:
    stream = configured(json=True, level="warning")

    with structlog.testing.capture_logs() as logs:
        structlog.get_logger("tokenwarden.worker.domain.handlers").debug("event.applied", revoked=1)

    assert [entry["event"] for entry in logs] == ["event.applied"]
    assert stream.getvalue() == ""


def test_records_still_name_their_caller_for_other_handlers() -> None:
    stream = configured(json=True)
    seen: list[logging.LogRecord] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    spy = Spy()
    logging.getLogger().addHandler(spy)
    try:
        structlog.get_logger().info("nameless")
        logging.getLogger("celery.worker").info("got %s", 1)
    finally:
        logging.getLogger().removeHandler(spy)

    ours, foreign = seen
    assert (ours.funcName, ours.name) == (
        "test_records_still_name_their_caller_for_other_handlers",
        __name__,
    )
    assert (foreign.msg, foreign.args) == ("got %s", (1,))
    assert [line["logger"] for line in json_lines(stream)] == [__name__, "celery.worker"]


def test_tokens_are_masked_in_keys_of_the_event_itself() -> None:
    stream = configured(json=True)
    token = generate(TokenKind.APPLICATION)

    structlog.get_logger().info("keyed", before=token, **{f"for_{token}": [token]}, after=3)

    assert_masked(stream.getvalue(), token)
    (line,) = json_lines(stream)
    assert (line["before"], line["for_sm_aat_***"], line["after"]) == (
        "sm_aat_***",
        ["sm_aat_***"],
        3,
    )


def test_tokens_are_masked_in_message_fields_and_nested_values() -> None:
    stream = configured(json=True)
    personal, application = generate(TokenKind.PERSONAL), generate(TokenKind.APPLICATION)
    log = structlog.get_logger("tokenwarden.worker.domain.issuing")

    log.info(f"issued {personal}")
    log.info("issued", token=application)
    log.info("payload", body={"items": [{"secret": personal}], "pair": (1, application)})
    log.info("keyed", by_token={personal: "owner"})
    log.info("got %s", application)

    output = stream.getvalue()
    for token in (personal, application):
        assert_masked(output, token)
    lines = json_lines(stream)
    assert lines[0]["event"] == "issued sm_pat_***"
    assert lines[1]["token"] == "sm_aat_***"
    assert lines[2]["body"] == {"items": [{"secret": "sm_pat_***"}], "pair": [1, "sm_aat_***"]}
    assert lines[3]["by_token"] == {"sm_pat_***": "owner"}
    assert lines[4]["event"] == "got sm_aat_***"


def test_tokens_are_masked_in_exceptions() -> None:
    stream = configured(json=True)
    token = generate(TokenKind.PERSONAL)
    log = structlog.get_logger("tokenwarden.worker.domain.verification")

    try:
        raise ValueError(f"unknown token {token}")
    except ValueError as exc:
        log.exception("verification failed")
        log.warning("verification failed", error=exc)
        logging.getLogger("celery.app.trace").error("task raised", exc_info=True)

    assert_masked(stream.getvalue(), token)
    structlog_line, field_line, stdlib_line = json_lines(stream)
    assert structlog_line["level"] == "error"
    assert "ValueError: unknown token sm_pat_***" in structlog_line["exception"]
    assert field_line["error"] == "ValueError('unknown token sm_pat_***')"
    assert "ValueError: unknown token sm_pat_***" in stdlib_line["exception"]


def test_tokens_are_masked_in_stdlib_format_args() -> None:
    stream = configured(json=True)
    token = generate(TokenKind.APPLICATION)

    logging.getLogger("uvicorn.error").info("got %s", token)

    assert_masked(stream.getvalue(), token)
    (line,) = json_lines(stream)
    assert (line["event"], line["logger"]) == ("got sm_aat_***", "uvicorn.error")


def test_values_without_tokens_are_untouched() -> None:
    stream = configured(json=True)
    when = datetime(2024, 5, 1, tzinfo=UTC)

    structlog.get_logger().info("sweep", count=3, ratio=0.5, done=True, cursor=None, at=when)

    (line,) = json_lines(stream)
    assert (line["count"], line["ratio"], line["done"], line["cursor"]) == (3, 0.5, True, None)
    assert line["at"] == repr(when)
    assert line["event"] == "sweep"


def test_console_mode_renders_a_readable_redacted_line() -> None:
    stream = configured(json=False)
    token = generate(TokenKind.PERSONAL)

    structlog.get_logger("tokenwarden.worker.domain.revocation").warning(
        "revoked", token=token, count=2
    )
    logging.getLogger("uvicorn.access").info("GET /verify?token=%s 200", token)

    output = stream.getvalue()
    assert_masked(output, token)
    first, second = output.splitlines()
    assert "revoked" in first
    assert "warning" in first
    assert "token=sm_pat_***" in first
    assert "count=2" in first
    assert not first.lstrip().startswith("{")
    assert "GET /verify?token=sm_pat_*** 200" in second


def test_terminal_stream_gets_the_console_renderer() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    configure_logging(stream=stream)

    structlog.get_logger().info("hello", answer=42)

    output = stream.getvalue()
    assert "hello" in output
    assert "answer=42" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output)


def test_configuring_twice_does_not_duplicate_lines() -> None:
    first = configured(json=True)
    second = configured(json=True)

    structlog.get_logger().info("once")
    logging.getLogger("celery.beat").info("once too")

    assert first.getvalue() == ""
    assert [line["event"] for line in json_lines(second)] == ["once", "once too"]
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "tokenwarden"]
    assert len(ours) == 1


def test_uvicorn_loggers_defer_to_the_root_handler() -> None:
    stray = logging.StreamHandler(io.StringIO())
    logging.getLogger("uvicorn.access").addHandler(stray)
    logging.getLogger("uvicorn.access").propagate = False

    stream = configured(json=True)
    logging.getLogger("uvicorn.access").info("GET / 200")

    assert [line["event"] for line in json_lines(stream)] == ["GET / 200"]
    assert stray.stream.getvalue() == ""


def test_url_passwords_and_query_values_are_masked_in_library_lines_and_tracebacks() -> None:
    stream = configured(json=True, level="DEBUG")
    url = "https://hooks:pa55word@hooks.example/notices?secret=qu3rys3cret&team=ops"

    logging.getLogger("somelib").info("POST %s", url)
    try:
        raise ConnectionError(f"cannot reach '{url}'")
    except ConnectionError:
        logging.getLogger("somelib").warning("gave up", exc_info=True)
        structlog.get_logger("tokenwarden.worker.runtime.webhook").exception("notice.attempt")

    output = stream.getvalue()
    assert "pa55word" not in output
    assert "qu3rys3cret" not in output
    assert "ops" not in output
    library, traced, ours = json_lines(stream)
    masked = "https://hooks:***@hooks.example/notices?secret=***&team=***"
    assert library["event"] == f"POST {masked}"
    assert masked in traced["exception"]
    assert masked in ours["exception"]


def test_http_client_request_lines_are_not_written_even_at_debug() -> None:
    stream = configured(json=True, level="DEBUG")

    logging.getLogger("httpx").info("HTTP Request: POST http://127.0.0.1:9/h?secret=x")
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    logging.getLogger("httpx").warning("something worth knowing")

    assert [line["event"] for line in json_lines(stream)] == ["something worth knowing"]


def test_a_url_user_alone_and_a_bare_query_value_are_masked_in_fields_too() -> None:
    stream = configured(json=True, level="DEBUG")
    alone = "https://k3yinus3r@hooks.example/n?b4res3cret"
    at_sign = "https://hooks:pa55@w0rd@hooks.example/n?a=1&&b=;c4"

    logging.getLogger("somelib").info("POST %s then %s", alone, at_sign)
    structlog.get_logger("worker.delivery").warning(
        "notice.attempt", error=f"ConnectError: cannot reach '{alone}'", url=at_sign
    )

    output = stream.getvalue()
    for secret in ("k3yinus3r", "b4res3cret", "pa55", "w0rd", "c4"):
        assert secret not in output
    library, ours = json_lines(stream)
    masked_alone = "https://***@hooks.example/n?***"
    masked_at_sign = "https://hooks:***@hooks.example/n?a=***&&b=***;***"
    assert library["event"] == f"POST {masked_alone} then {masked_at_sign}"
    assert ours["error"] == f"ConnectError: cannot reach '{masked_alone}'"
    assert ours["url"] == masked_at_sign


def test_a_url_without_secrets_is_left_as_it_is() -> None:
    stream = configured(json=True)

    structlog.get_logger("worker.delivery").info(
        "notice.attempt", receiver="http://127.0.0.1:8080", broker="amqp://guest:***@mq:5672//"
    )

    [line] = json_lines(stream)
    assert line["receiver"] == "http://127.0.0.1:8080"
    assert line["broker"] == "amqp://guest:***@mq:5672//"
