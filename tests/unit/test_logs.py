"""Safe worker logs (stream/logs.py): data cannot forge log lines, and repeated connection errors are counted."""

from __future__ import annotations

import io
import logging
import traceback
from collections.abc import Iterator

import faust
import pytest

from stream.logs import KAFKA_LOGGERS, EscapeData, RateLimit, exception_text, install, kafka_logging, printable

FORGED = "agent-7\n[2026-12-02 01:00:00,000] [1] [ERROR] forged line\r\x1b[2K"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\nb"),
        ("a\rb", "a\\rb"),
        ("a\tb", "a\\tb"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("nul\x00 del\x7f nel\x85", "nul\\x00 del\\x7f nel\\x85"),
        ("line\u2028sep\u2029", "line\\u2028sep\\u2029"),
        ("rlo\u202eevil", "rlo\\u202eevil"),
        ("ok: é 代理 🤖 \\n", "ok: é 代理 🤖 \\n"),  # letters, emoji and a literal backslash stay as they are
    ],
)
def test_printable_escapes_control_characters_only(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_printable_is_idempotent_and_takes_any_object() -> None:
    once = printable(FORGED)
    assert printable(once) == once and "\n" not in once and "\r" not in once and "\x1b" not in once
    assert printable(ValueError("x\ny")) == "x\\ny"


@pytest.fixture
def root() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A stand-in for the worker's root logger: one stream handler, the filters installed on it."""
    out = io.StringIO()
    logger = logging.getLogger("test-logs-root")
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    install(logger)
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)


def child(root: logging.Logger, name: str) -> logging.Logger:
    """A logger named ``name`` whose records reach ``root``'s handler, as every logger reaches the real root's."""
    logger = logging.getLogger(name)
    logger.parent = root
    logger.propagate = True
    logger.setLevel(logging.DEBUG)
    return logger


def test_an_alert_summary_with_a_newline_is_one_log_line(root: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = root
    child(logger, "writeguard.worker").warning("ALERT %s", f"public.refunds: agent {FORGED}: amount = 1,000.00")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("[WARNING] writeguard.worker: ALERT public.refunds: agent agent-7\\n[2026")
    assert "forged line\\r\\x1b[2K: amount" in lines[0]


def test_our_messages_are_escaped_even_when_built_with_an_f_string(root: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = root
    child(logger, "writeguard.enforce").error(f"cannot revoke {FORGED}")
    assert len(out.getvalue().splitlines()) == 1


def test_a_client_librarys_multi_line_message_is_left_alone(root: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = root  # Faust's partition tables are multi-line on purpose, and carry no data
    child(logger, "faust.assignor").info("Assigned:\n%s", "+-------+\n| t | 0 |")
    assert len(out.getvalue().splitlines()) == 3


def test_an_exceptions_message_is_escaped_and_its_traceback_kept(root: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = root
    try:
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise ValueError(f"bad agent {FORGED}") from e
    except ValueError:
        child(logger, "faust.agents").exception("Agent crashed")
    text = out.getvalue()
    assert "forged line" in text and "\n[2026-12-02" not in text and "\x1b" not in text
    assert "ValueError: bad agent agent-7\\n[2026-12-02 01:00:00,000] [1] [ERROR] forged line\\r\\x1b[2K" in text
    assert "KeyError: 'inner'" in text and "The above exception was the direct cause" in text
    assert text.count("Traceback (most recent call last):") == 2


def test_exception_text_matches_python_for_a_harmless_exception() -> None:
    try:
        try:
            {}["k"]
        except KeyError:
            raise RuntimeError("plain") from None
    except RuntimeError as e:
        assert exception_text(e) == "".join(traceback.format_exception(e))
    try:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            raise LookupError("during")  # noqa: B904 - the implicit context is what is tested
    except LookupError as e:
        assert exception_text(e) == "".join(traceback.format_exception(e))


def test_a_bad_format_string_does_not_raise_into_the_caller() -> None:
    rec = record("writeguard.worker", "two %s %s", "one")
    assert EscapeData().filter(rec) is True  # left as it is: the handler reports it, as it always does
    assert (rec.msg, rec.args) == ("two %s %s", ("one",))


# --- rate limit of repeated connection errors -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_an_outage_of_100_s_writes_one_line_per_interval_with_the_count() -> None:
    clock = Clock()
    limit = RateLimit(interval_s=30, clock=clock)
    passed: list[str] = []
    for i in range(1000):  # aiokafka's reconnect loop: 10 lines a second for 100 s
        clock.now = i / 10
        rec = record("aiokafka.conn", "Unable connect to node with id %s: %s", 1, "[Errno 111] Connect call failed")
        if limit.filter(rec):
            passed.append(rec.getMessage())
    assert passed == [
        "Unable connect to node with id 1: [Errno 111] Connect call failed",
        "Unable connect to node with id 1: [Errno 111] Connect call failed (299 more like it in the last 30 s)",
        "Unable connect to node with id 1: [Errno 111] Connect call failed (299 more like it in the last 30 s)",
        "Unable connect to node with id 1: [Errno 111] Connect call failed (299 more like it in the last 30 s)",
    ]


def test_each_message_has_its_own_interval_and_the_count_covers_the_gap() -> None:
    clock = Clock()
    limit = RateLimit(interval_s=10, clock=clock)
    assert limit.filter(record("aiokafka.client", "Unable to update metadata from %s", [1]))
    assert limit.filter(record("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s", 1, "x"))
    assert not limit.filter(record("aiokafka.client", "Unable to update metadata from %s", [1]))
    assert limit.filter(record("aiokafka.client", "Unable to update metadata from %s", [1], level=logging.WARNING))
    clock.now = 95.0  # long after: one held back, said on the next line
    rec = record("aiokafka.client", "Unable to update metadata from %s", [1])
    assert (
        limit.filter(rec) and rec.getMessage() == "Unable to update metadata from [1] (1 more like it in the last 95 s)"
    )
    rec = record("aiokafka.client", "Unable to update metadata from %s", [1])
    clock.now = 106.0
    assert limit.filter(rec) and rec.getMessage() == "Unable to update metadata from [1]"  # nothing was held back


def test_librdkafka_lines_are_told_apart_by_their_facility() -> None:
    limit = RateLimit(interval_s=30, clock=Clock())
    fail = ("FAIL", "rdkafka#consumer-2", "Connect to ipv4#127.0.0.1:9092 failed: Connection refused")
    assert limit.filter(record("writeguard.kafka", "%s [%s] %s", *fail))
    assert not limit.filter(record("writeguard.kafka", "%s [%s] %s", *fail))
    assert limit.filter(record("writeguard.kafka", "%s [%s] %s", "GETPID", "rdkafka#producer-1", "retrying"))


def test_alerts_info_lines_and_other_loggers_are_never_held_back() -> None:
    limit = RateLimit(interval_s=30, clock=Clock())
    for _ in range(5):
        assert limit.filter(record("writeguard.worker", "ALERT %s", "same summary", level=logging.WARNING))
        assert limit.filter(record("aiokafka.consumer.group_coordinator", "LeaveGroup request", level=logging.INFO))
        assert limit.filter(record("urllib3", "retrying %s", 1))
    assert {n.split(".")[0] for n in KAFKA_LOGGERS} >= {"aiokafka", "faust", "writeguard"}


def test_the_rate_limit_remembers_a_bounded_number_of_messages() -> None:
    limit = RateLimit(interval_s=30, clock=Clock(), max_keys=10)
    for i in range(1000):
        limit.filter(record("aiokafka.conn", f"error {i}"))
    assert len(limit._seen) == 10  # noqa: SLF001 - the bound is the point


def test_the_limit_works_through_a_handler_on_child_loggers(root: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = root  # a logger's own filters would miss its children's records: the handler's see them
    for _ in range(50):
        child(logger, "aiokafka.conn").error("Unable connect to node with id %s: %s", 1, "refused")
    assert out.getvalue().count("Unable connect") == 1


def test_install_twice_adds_each_filter_once(root: tuple[logging.Logger, io.StringIO]) -> None:
    logger, _ = root
    install(logger)
    [handler] = logger.handlers
    assert sorted(type(f).__name__ for f in handler.filters) == ["EscapeData", "RateLimit"]


def test_the_worker_installs_the_filters_on_the_root_handlers_faust_sets_up() -> None:
    from stream.app import _Worker

    logger = logging.getLogger("test-logs-worker-root")
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    try:
        worker = _Worker(faust.App("test-logs", web_enabled=False), quiet=True, loglevel="warning")
        worker.on_setup_root_logger(logger, logging.WARNING)
        kinds = {type(f) for f in handler.filters}
        assert {RateLimit, EscapeData} <= kinds
    finally:
        logger.removeHandler(handler)


def test_our_kafka_clients_log_through_python_logging() -> None:
    settings = kafka_logging({"bootstrap.servers": "127.0.0.1:9"})
    assert settings["bootstrap.servers"] == "127.0.0.1:9" and settings["logger"].name == "writeguard.kafka"
    assert isinstance(EscapeData().names, tuple)
