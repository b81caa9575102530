"""Structured logs for the gateway: one JSON object per line with time, level, logger, request id and
message. Messages never hold patient names or IDs: errors name instances by their place in the upload."""

from __future__ import annotations

import json
import logging
import time

from cspine.gateway.interceptors import RequestIdFilter


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str = "INFO", stream=None) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr) as JSON lines with the request id."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))  # it narrates every module it copies
    return handler
