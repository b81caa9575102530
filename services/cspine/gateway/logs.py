"""Logs of every cspine command: for the gateway one JSON object per line with time, level, logger, request id
and message; plain lines for the other commands. Messages never hold patient names or IDs: errors name
instances by their place in the upload, attributes by keyword.

Patient data stays out by construction, not by care at each call: pydicom and highdicom quote the values they
refuse ("Invalid value for VR DA: '03.02.1901'", "Patient's Name PN: 'O'Brien'"), with either quote, a value
that may itself hold quotes or line breaks, and exceptions from them carry those values into tracebacks. Every
message and every exception text is therefore redacted (everything from its first quote to its last replaced)
before it is written (the lines of Triton's own log excepted: Triton sees tensors, never a header), a log
call whose arguments do not fit its message is written without them (logging would print them raw on stderr),
and Python warnings are routed into the log instead of going to stderr raw."""

from __future__ import annotations

import json
import logging
import re
import time
import traceback

from cspine.gateway.interceptors import RequestIdFilter

# From the first quote (' or ") to the last, across lines: how pydicom, highdicom and Python (repr) show a value
# is quoted, but the value may hold quotes of either kind itself ("O'Brien") and the text around it may too
# ("Patient's Name"), so pairing quotes could leave part of a value out in the open. Greedy loses the text
# between two quoted parts of one message, never a value.
_QUOTED = re.compile(r"""b?['"].*['"]""", re.DOTALL)
REDACTED = "'<redacted>'"


def redact(text: str) -> str:
    """``text`` with everything from its first quote to its last replaced by ``'<redacted>'``."""
    return _QUOTED.sub(REDACTED, text)


def _message(record: logging.LogRecord) -> str:
    """The record's message, redacted unless it is a line of Triton's own log (``extra={"triton_log": True}``):
    Triton sees tensors only, never a DICOM header, and its lines name models in quotes."""
    message = safe_message(record)
    return message if getattr(record, "triton_log", False) else redact(message)


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
        record.msg, record.args = _message(record), None
        if record.exc_info:  # a Formatter shows a cached exc_text rather than formatting exc_info itself
            record.exc_text = redacted_exception(record.exc_info)
        # stack_info is left as it is: frames only (file, line, code), like the frames of a traceback.
        return True


def safe_message(record: logging.LogRecord) -> str:
    """The record's message; where its arguments do not fit it, the message alone (logging would otherwise
    print the arguments, raw, on stderr)."""
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - any formatting failure
        return f"{record.msg} (a log call whose arguments do not fit its message; arguments left out)"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the message and exception are redacted whether a filter ran or not."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": _message(record),
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):  # the DICOM node's audit fields: UIDs, peers, AE titles, counts, outcomes
            entry["audit"] = {key: redact(str(value)) for key, value in audit.items()}
        if record.exc_info:
            entry["exception"] = redacted_exception(record.exc_info)
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        return json.dumps(entry)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "INFO", stream=None, *, json_lines: bool = True) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr), redacted, Python warnings included
    (pydicom's would otherwise reach stderr raw, values and all): as JSON lines with the request id (the
    gateway), or as plain lines (``json_lines=False``: the other commands)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter())
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))  # it narrates every module it copies
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))  # and this every PDU and C-STORE
    return handler
