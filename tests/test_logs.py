"""Log formatting for the production entry point."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

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


def test_request_log_fields_cannot_be_forged_or_split(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    from app.logs import RequestLog

    caplog.set_level(logging.INFO, logger="app.requests")
    RequestLog().line("rid", "chat", 'm status=200\nFAKE line="x"', "v1/chat/completions",
                      400, None, 1.5, None)
    text = caplog.records[-1].getMessage()
    assert "\n" not in text
    assert 'model="m status=200\\nFAKE line=\\"x\\""' in text
    assert " route=v1/chat/completions " in text and " status=400 " in text


@pytest.mark.parametrize("value", ["a=b", "a b", 'a"b', "a\tb", "a\u0000b", "", "é"])
def test_odd_values_are_quoted(value: str) -> None:
    from app.logs import _text

    assert _text(value) == json.dumps(value)


def test_logging_output_goes_to_a_file(tmp_path: Path) -> None:
    from app.config import settings_from_mapping
    from app.logs import configure

    target = tmp_path / "olla.log"
    logger = logging.getLogger("app")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers.clear()
    try:
        configure(settings_from_mapping({"logging": {"output": str(target)}}, environ={}))
        logging.getLogger("app.test").warning("to the file")
        for handler in logger.handlers:
            handler.flush()
        assert "to the file" in target.read_text()
    finally:
        for handler in logger.handlers:
            handler.close()
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
