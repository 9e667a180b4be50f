"""No log line carries the bot token or a database password, whoever writes it."""

from __future__ import annotations

import logging

import pytest

from dbkeeper.logs import SECRETS, RedactingFormatter, redact, setup_logging

TOKEN = "987654321:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"


@pytest.fixture
def captured() -> list[str]:
    setup_logging("INFO", [TOKEN, "s3cr3t-pass"])
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(RedactingFormatter("%(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    yield lines
    logging.getLogger().removeHandler(handler)


def test_httpx_request_lines_are_redacted_or_silenced(captured: list[str]) -> None:
    url = f"https://api.telegram.org/bot{TOKEN}/getUpdates"
    logging.getLogger("httpx").info('HTTP Request: POST %s "HTTP/1.1 200 OK"', url)
    logging.getLogger("httpx").warning("HTTP Request failed: POST %s", url)
    logging.getLogger("telegram.ext").error("The token `%s` was rejected by the server.", TOKEN)
    assert not any(TOKEN in line for line in captured)
    assert captured and any("[REDACTED]" in line for line in captured)


def test_tracebacks_and_url_passwords_are_redacted(captured: list[str]) -> None:
    try:
        raise RuntimeError(f"connect to postgresql://bot:s3cr3t-pass@db/bot with {TOKEN}")
    except RuntimeError:
        logging.getLogger("dbkeeper.test").exception("failed")
    text = "\n".join(captured)
    assert "s3cr3t-pass" not in text and TOKEN not in text
    assert "postgresql://bot:***@db/bot" in text or "[REDACTED]" in text


def test_unknown_tokens_and_passwords_are_caught_by_shape() -> None:
    SECRETS.add("unrelated-secret")
    assert redact("bot1234567:ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef123/getMe") == "bot[REDACTED]/getMe"
    assert redact("postgresql+psycopg://u:pw@host/db") == "postgresql+psycopg://u:***@host/db"
