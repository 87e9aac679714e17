"""The exceptions raised for malformed or too-new messages."""

from __future__ import annotations


class ProtocolError(ValueError):
    """Raised for any frame sequence that is not a valid stiffmon message."""


class ProtocolVersionError(ProtocolError):
    """Raised when a message uses a protocol version this stiffmon does not understand."""
