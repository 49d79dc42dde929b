"""The one exception type that means "the user gave us something wrong".

The CLI turns an :class:`AutomtlError` into one clear sentence and exit code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import math
from typing import Any, Optional


class AutomtlError(Exception):
    """A user mistake: the message names what is wrong and what to do."""


class BackboneError(AutomtlError):
    """The backbone cannot be loaded, traced or converted."""


class TraceError(BackboneError):
    """torch.fx cannot trace the forward of the backbone's module at ``path`` ("" for the backbone itself; None:
    unknown), for ``reason`` (the error, at the user's line); the message says how to go on (a leaf module,
    ``concrete_args``, a rewritten line)."""

    def __init__(self, message: str, path: Optional[str] = None, reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason


class ConfigError(AutomtlError):
    """A configuration value, task spec or policy file is invalid."""


class TooLargeError(ConfigError):
    """What was asked for would hold at least ``least`` elements, more than the ``limit`` allowed (e.g.
    ``supermodel(..., max_elements=)``: the supermodel a run folder's config describes against its weights)."""

    def __init__(self, message: str, least: int, limit: int):
        super().__init__(message)
        self.least, self.limit = least, limit

    def __reduce__(self):  # pickle and copy rebuild it from all three (a worker or a spawned rank may raise it)
        return type(self), (str(self), self.least, self.limit), self.__dict__


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


def finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float (not a bool) that is a finite float: an integer too large for a float
    (a file's 400-digit number, on which ``math.isfinite`` and ``float`` raise OverflowError) is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for a message that quotes a value read from a file; an integer of
    hundreds of digits by its length (Python refuses to print one past 4300 digits at all)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        return repr(value)[:limit]
    except ValueError:  # a container holding such an integer
        return f"a {type(value).__name__} of unprintable numbers"
