"""One exception hierarchy for everything fedbell rejects."""

from __future__ import annotations


class FedbellError(Exception):
    """Base of every error fedbell raises on purpose."""


class ConfigError(FedbellError):
    """A configuration file is missing, unreadable or invalid."""


class RejectedMessage(FedbellError):
    """A message from the network failed validation and was dropped.

    `reason` is a short stable key (for counters and metrics); the message
    text says what exactly was wrong and where.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
