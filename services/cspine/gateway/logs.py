"""Structured logs for the gateway: one JSON object per line with time, level, logger, request id and
message. Messages never hold patient names or IDs: errors name instances by their place in the upload.

Patient data stays out by construction, not by care at each call: pydicom and highdicom quote the values they
refuse ("Invalid value for VR DA: '03.02.1901'"), and exceptions from them carry those values into tracebacks.
Every message and every exception text is therefore redacted (quoted text replaced) before it is written, and
Python warnings are routed into the log instead of going to stderr raw."""

from __future__ import annotations

import json
import logging
import re
import time
import traceback

from cspine.gateway.interceptors import RequestIdFilter

# A quoted run ('…', "…", or the b'…' of bytes): how pydicom, highdicom and Python (repr) show a value.
_QUOTED = re.compile(r"b?'[^'\n]*'|b?\"[^\"\n]*\"")
REDACTED = "'<redacted>'"


def redact(text: str) -> str:
    """``text`` with every quoted value replaced by ``'<redacted>'``."""
    return _QUOTED.sub(REDACTED, text)


def redacted_exception(exc_info) -> str:
    """A traceback's frames (code locations only) with each exception of the chain shown by its type and a
    redacted message: the frames hold no values, the messages may."""
    _, error, tb = exc_info
    parts = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = "".join(traceback.format_tb(error.__traceback__ or tb))
        parts.append(f"Traceback (most recent call last):\n{frames}{type(error).__qualname__}: {redact(str(error))}")
        error, tb = (error.__cause__ or (None if error.__suppress_context__ else error.__context__)), None
    return "\n\nThe above was raised from or while handling:\n\n".join(parts)


class RedactingFilter(logging.Filter):
    """Redacts a record in place (message, arguments folded in; exception as redacted text), for any handler
    whatever its formatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:  # a Formatter shows a cached exc_text rather than formatting exc_info itself
            record.exc_text = redacted_exception(record.exc_info)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the message and exception are redacted whether a filter ran or not."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redacted_exception(record.exc_info)
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        return json.dumps(entry)


def configure(level: str = "INFO", stream=None) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr) as JSON lines with the request id, redacted,
    Python warnings included (pydicom's would otherwise reach stderr raw, values and all)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter())
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))  # it narrates every module it copies
    return handler
