"""Secrets out of logs and published statuses: URL credentials and secret parameters.

An RTSP camera URL carries its password (`rtsp://admin:hunter2@cam.lan/...`).
It must reach OpenCV and nothing else: every log line of a fedbell process
goes through `RedactingFormatter`, and every text a doorbell publishes
(its retained status, systemd's status line) through `redact`.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://user:password@host  or  scheme://user@host (a token as user name)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@'\"]+@")
# ?password=...&token=...
_SECRET_PARAMETER = re.compile(
    r"(?P<name>[?&;](?:password|passwd|pwd|pass|secret|token|key|auth|apikey|api_key)=)[^&\s'\"]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with every URL's user information and secret query parameters masked."""
    text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    return _SECRET_PARAMETER.sub(rf"\g<name>{MASK}", text)


class RedactingFormatter(logging.Formatter):
    """Wraps a formatter; its whole output (message, arguments, traceback) is redacted."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def redact_logging(root: logging.Logger | None = None) -> None:
    """Make every handler of the root logger redact (call after basicConfig)."""
    for handler in (root or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
