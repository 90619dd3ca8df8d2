"""Errors the domain raises for requests it refuses."""

from __future__ import annotations


class Refused(Exception):
    """A request tokenwarden will not carry out; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
