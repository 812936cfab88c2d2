"""Argument checks shared by every entry point, run before any SQL so bad input writes nothing."""

from __future__ import annotations

import re
from datetime import timedelta

from .errors import InvalidInput
from .model import FailureKind

MAX_NAME_LENGTH = 200
MAX_MESSAGE_LENGTH = 1_000_000
"""A failure message longer than this (in characters) is refused as absurd."""
STORED_MESSAGE_LENGTH = 2_000
"""Failure messages are stored truncated to this many characters."""

_CREDENTIAL_REF = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*|file:/\S+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def name(value: object, what: str) -> str:
    if value is None:
        raise InvalidInput(f"{what} name is required, got None")
    if not isinstance(value, str):
        raise InvalidInput(f"{what} name must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidInput(f"{what} name must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidInput(f"{what} name is {len(value)} characters long; the limit is {MAX_NAME_LENGTH}")
    if _CONTROL.search(value):
        raise InvalidInput(f"{what} name {value!r} contains control characters")
    return value


def optional_name(value: object, what: str) -> str | None:
    return None if value is None else name(value, what)


def credential_ref(value: object) -> str:
    if not isinstance(value, str) or not _CREDENTIAL_REF.fullmatch(value):
        raise InvalidInput(
            "credential_ref must be a reference, 'env:VARIABLE' or 'file:/absolute/path', "
            "never the secret itself"
        )
    return value


def kind(value: object) -> FailureKind:
    if isinstance(value, FailureKind):
        return value
    if isinstance(value, str):
        try:
            return FailureKind(value)
        except ValueError:
            pass
    allowed = ", ".join(k.value for k in FailureKind)
    raise InvalidInput(f"kind must be a FailureKind ({allowed}), got {value!r}")


def message(value: object) -> str:
    """The message as stored: refused when absurd, truncated to STORED_MESSAGE_LENGTH otherwise."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"message must be a str, got {type(value).__name__}")
    if len(value) > MAX_MESSAGE_LENGTH:
        raise InvalidInput(
            f"message is {len(value)} characters long; the limit is {MAX_MESSAGE_LENGTH} "
            f"(only the first {STORED_MESSAGE_LENGTH} are stored)"
        )
    # Postgres text cannot hold NUL.
    return value[:STORED_MESSAGE_LENGTH].replace("\x00", "\ufffd")


def integer(value: object, what: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidInput(f"{what} must be at least {minimum}, got {value}")
    if abs(value) >= 2**31:
        raise InvalidInput(f"{what} must fit in 32 bits, got {value}")
    return value


def boolean(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} must be a bool, got {value!r}")
    return value


def duration(value: object, what: str) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
        raise InvalidInput(f"{what} must be a timedelta or a number of seconds, got {value!r}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not 0 <= seconds <= 366 * 86400:
        raise InvalidInput(f"{what} must be between 0 and 366 days, got {seconds} s")
    return timedelta(seconds=seconds)
