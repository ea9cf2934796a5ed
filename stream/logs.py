"""Safe worker logs: values from the data cannot forge log lines, and an outage does not flood the log.

* :func:`printable` renders control characters (``\\n``, ``\\r``, ESC, the bidirectional overrides, ...) as escapes,
  so an agent id with a newline in it stays on its own line and cannot recolour a terminal.
* :class:`EscapeData` applies it to every record of writeguard's own loggers (whose messages carry agent ids, row
  values and record details) and to the exception text of every record (an exception's message may quote data).
* :class:`RateLimit` lets through one line per interval for each message of the Kafka clients' loggers (aiokafka,
  Faust, librdkafka through ``writeguard.kafka``), with the count of those it held back: a broker outage otherwise
  writes the same few connection errors thousands of times.

:func:`install` puts both on the handlers of a logger (the root logger of the worker).
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# C0 and C1 controls, DEL, the line and paragraph separators, and the marks and overrides that reorder text.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def printable(value: object) -> str:
    """``str(value)`` with every control character as an escape; idempotent, so it may be applied twice.

    >>> print(printable("agent-7\\n[ERROR] forged line"))
    agent-7\\n[ERROR] forged line
    >>> printable("red \\x1b[31m\\r\\u202e"), printable("ok: é 代理 🤖")
    ('red \\\\x1b[31m\\\\r\\\\u202e', 'ok: é 代理 🤖')
    >>> printable(printable("a\\nb")) == printable("a\\nb")
    True
    """
    s = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_escape, s)


def exception_text(exc: BaseException) -> str:
    """The traceback as :func:`traceback.format_exception` writes it, each exception's message made printable.

    The frames are code (file, line, source); only the messages can carry data, and they are the part escaped.

    >>> try:
    ...     raise ValueError("bad id 'a\\nERROR forged'")
    ... except ValueError as e:
    ...     print(exception_text(e).splitlines()[-1])
    ValueError: bad id 'a\\nERROR forged'
    """
    return "".join(_exception_parts(exc, set()))


def _exception_parts(exc: BaseException, seen: set[int]) -> list[str]:
    seen.add(id(exc))
    out: list[str] = []
    cause, context = exc.__cause__, exc.__context__
    if cause is not None and id(cause) not in seen:
        out += _exception_parts(cause, seen)
        out.append("\nThe above exception was the direct cause of the following exception:\n\n")
    elif context is not None and not exc.__suppress_context__ and id(context) not in seen:
        out += _exception_parts(context, seen)
        out.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    if exc.__traceback__ is not None:
        out.append("Traceback (most recent call last):\n")
        out += traceback.format_tb(exc.__traceback__)
    only = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
    out.append(printable(only) + "\n")
    return out


class EscapeData(logging.Filter):
    """Makes records printable: the whole message of ``names``' loggers, and every record's exception text.

    Our own messages carry data (agent ids, summaries, record details), sometimes inside an f-string: the message
    is rendered and escaped as a whole. The client libraries' messages carry broker state and the config, and some
    are multi-line on purpose (Faust's assignment tables): only their exceptions are escaped.
    """

    def __init__(self, names: Iterable[str] = ("writeguard",)) -> None:
        super().__init__()
        self.names = tuple(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if _under(record.name, self.names):
            try:
                message = record.getMessage()
            except (TypeError, ValueError):  # a bad format string: left for the handler to report, as it does
                return True
            record.msg, record.args = printable(message), ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = exception_text(record.exc_info[1]).rstrip("\n")
        return True


def _under(name: str, names: tuple[str, ...]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in names)


@dataclass(slots=True)
class _Seen:
    since: float  # when the last line was let through: its interval began
    held: int = 0  # lines held back since


# The loggers of the Kafka clients the worker runs: during an outage each repeats its few connection errors
# several times a second (aiokafka: "Unable connect to node with id %s: %s", "Unable to update metadata from %s").
KAFKA_LOGGERS = ("aiokafka", "kafka", "faust", "mode", "writeguard.kafka")


class RateLimit(logging.Filter):
    """One line per ``interval_s`` for each repeated WARNING-or-worse message of ``names``' loggers.

    A message is its logger, level, format string and first argument (aiokafka's node id, librdkafka's facility,
    which comes after the format ``"%s [%s] %s"``): the same error at another offset or time is a repeat.
    The first line of an interval goes through; the next ones are counted and held back, and the first line after
    the interval says how many were. Messages of other loggers, and INFO or less, always go through.

    >>> now = [0.0]
    >>> limit = RateLimit(interval_s=30, clock=lambda: now[0])
    >>> def rec(msg, *args):
    ...     return logging.LogRecord("aiokafka.conn", logging.ERROR, "f", 1, msg, args, None)
    >>> [limit.filter(rec("Unable connect to node with id %s: %s", n, "refused")) for n in (1, 1, 2, 1)]
    [True, False, True, False]
    >>> now[0] = 31.0
    >>> r = rec("Unable connect to node with id %s: %s", 1, "refused")
    >>> limit.filter(r), r.getMessage()
    (True, 'Unable connect to node with id 1: refused (2 more like it in the last 31 s)')
    """

    def __init__(
        self,
        interval_s: float = 30.0,
        names: Iterable[str] = KAFKA_LOGGERS,
        *,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1_000,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.names = tuple(names)
        self.level = level
        self.clock = clock
        self.max_keys = max_keys  # bounded, whatever the messages: the oldest are forgotten
        self._seen: dict[tuple[str, int, str, str], _Seen] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or not _under(record.name, self.names):
            return True
        first = record.args[0] if isinstance(record.args, tuple) and record.args else ""
        key = (record.name, record.levelno, str(record.msg), str(first)[:100])
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.since < self.interval_s:
            seen.held += 1
            return False
        if seen is not None and seen.held:
            try:
                message = record.getMessage()
            except (TypeError, ValueError):
                message = str(record.msg)
            record.msg, record.args = f"{message} ({seen.held} more like it in the last {now - seen.since:.0f} s)", ()
        self._seen.pop(key, None)  # re-inserted last: the dict's order is the order of use
        self._seen[key] = _Seen(now)
        while len(self._seen) > self.max_keys:
            del self._seen[next(iter(self._seen))]
        return True


def install(logger: logging.Logger | None = None, *, interval_s: float = 30.0) -> None:
    """Put :class:`RateLimit` then :class:`EscapeData` on every handler of ``logger`` (the root logger by default).

    Filters on handlers, not loggers: a logger's own filters never see the records of its child loggers
    (``aiokafka.conn``), a handler's see them all. Installing twice changes nothing.
    """
    target = logger if logger is not None else logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RateLimit) for f in handler.filters):
            handler.addFilter(RateLimit(interval_s))
        if not any(isinstance(f, EscapeData) for f in handler.filters):
            handler.addFilter(EscapeData())


LIBRDKAFKA = logging.getLogger("writeguard.kafka")
"""The logger given to our confluent-kafka clients (``"logger"`` setting), so their lines are rate-limited too."""


def kafka_logging(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` for a confluent-kafka client, with librdkafka's log lines sent to :data:`LIBRDKAFKA`.

    >>> kafka_logging({"bootstrap.servers": "k:9092"})["logger"].name
    'writeguard.kafka'
    """
    return {**settings, "logger": LIBRDKAFKA}
