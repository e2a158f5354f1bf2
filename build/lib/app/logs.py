"""Logging for the production entry point: text or JSON lines on stderr."""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from .config import Settings

if TYPE_CHECKING:
    from .stats import Exchange


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    _standard = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._standard})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(settings: Settings) -> None:
    """Send the ``app`` loggers to stderr in the configured format (once per process)."""
    logger = logging.getLogger("app")
    logger.setLevel(settings.log_level.upper())
    if logger.handlers:
        return
    handler = _handler(settings.log_output)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


def _handler(output: str) -> logging.Handler:
    """Where ``logging.output`` says: stdout, stderr, or a file (reopened when moved)."""
    if output == "stdout":
        return logging.StreamHandler(sys.stdout)
    if output == "stderr":
        return logging.StreamHandler(sys.stderr)
    return logging.handlers.WatchedFileHandler(output, encoding="utf-8")


class RequestLog:
    """One line per request under the proxy prefix: request id, endpoint, model, route,
    status, time to first byte, total, tokens. Text as ``key=value`` pairs; with
    ``logging.format: json`` the same fields as JSON keys."""

    def __init__(self) -> None:
        self.log = logging.getLogger("app.requests")

    def line(self, request_id: str, endpoint: str, model: str, route: str, status: int,
             ttfb_ms: float | None, total_ms: float,
             usage: tuple[int | None, int | None, float | None] | None,
             outcome: str = "ok", key: str = "") -> None:
        """Write one request's line (``key``: the API key's name, never the key)."""
        if not self.log.isEnabledFor(logging.INFO):
            return
        prompt, completion, rate = usage or (None, None, None)
        fields: dict[str, Any] = {
            "request_id": request_id, "key": key or None, "endpoint": endpoint,
            "model": model, "route": route,
            "status": status, "outcome": outcome,
            "ttfb_ms": round(ttfb_ms, 1) if ttfb_ms is not None else None,
            "total_ms": round(total_ms, 1), "prompt_tokens": prompt,
            "completion_tokens": completion,
            "tokens_per_second": round(rate, 1) if rate is not None else None}
        text = " ".join(f"{k}={_text(v)}" for k, v in fields.items() if v is not None)
        self.log.info("%s", text, extra=fields)

    def exchange(self, exchange: Exchange, request_id: str, status: int) -> None:
        """The line for a finished proxied request."""
        self.line(request_id, exchange.state.endpoint.name, exchange.model, exchange.route,
                  status, exchange.ttfb_ms, exchange.total_ms, exchange.usage(),
                  "ok" if exchange.ok else "upstream_error", exchange.client)

    def stream_done(self, exchange: Exchange) -> None:
        """The line for a stream, when it ends."""
        self.exchange(exchange, exchange.request_id, exchange.status)


_PLAIN = re.compile(r"[A-Za-z0-9._:@/+\-()]+")


def _text(value: Any) -> str:
    """A value as one ``key=value`` field: as it is when plain, otherwise JSON-quoted, so
    a client cannot forge or split fields (spaces, quotes, ``=``, control characters and
    newlines are escaped)."""
    if isinstance(value, (int, float)):
        return str(value)  # figures: plain by construction (the common case, kept cheap)
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)
