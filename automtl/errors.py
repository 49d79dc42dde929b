"""The one exception type that means "the user gave us something wrong".

The CLI turns an :class:`AutomtlError` into one clear sentence and exit code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from typing import Optional


class AutomtlError(Exception):
    """A user mistake: the message names what is wrong and what to do."""


class BackboneError(AutomtlError):
    """The backbone cannot be loaded, traced or converted."""


class ConfigError(AutomtlError):
    """A configuration value, task spec or policy file is invalid."""


class DataError(AutomtlError):
    """A dataset is missing, malformed or does not fit the tasks."""


class FileFormatError(AutomtlError):
    """A model or policy file is unreadable, truncated or does not match its description."""


class StorageError(AutomtlError):
    """A file could not be written: the disk is full or read-only, or permission is denied."""


def first_line(exc: BaseException, limit: Optional[int] = 160) -> str:
    """An exception's first line (its type name when it has no text), cut to ``limit`` characters (None: whole);
    fx appends the node's code on lines of its own."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
