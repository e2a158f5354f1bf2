"""Log formatting for the production entry point."""

from __future__ import annotations

import json
import logging

from app.logs import JsonFormatter


def test_json_lines_carry_message_and_extra_fields() -> None:
    record = logging.LogRecord("app.views", logging.WARNING, __file__, 1, "upstream %s down",
                               ("a",), None)
    record.request_id = "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning"
    assert line["logger"] == "app.views"
    assert line["message"] == "upstream a down"
    assert line["request_id"] == "abc"
    assert line["time"].endswith("Z")
