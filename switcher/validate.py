"""Argument checks shared by every entry point, run before any SQL so that bad input writes nothing."""

from __future__ import annotations

import math
import re
import unicodedata
from datetime import timedelta

from .errors import InvalidInput
from .model import FailureKind
from .redact import redact

MAX_NAME_LENGTH = 200
MAX_MESSAGE_LENGTH = 1_000_000
"""A failure message longer than this (in characters) is refused as absurd."""
STORED_MESSAGE_LENGTH = 2_000
"""Failure messages are stored redacted and truncated to this many characters."""
MAX_DURATION = timedelta(days=3660)

_CREDENTIAL_REF = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*|file:/[^\x00-\x20\x7f]+")
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
# Unicode categories a name must not contain: controls (C0, C1), format characters (zero-width and bidi
# controls among them), surrogates, private use, unassigned code points, line and paragraph separators.
_FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def name(value: object, what: str) -> str:
    """A name as stored: NFC, printable, no surrounding space, at most MAX_NAME_LENGTH characters."""
    if value is None:
        raise InvalidInput(f"{what} name is required, got None")
    if not isinstance(value, str):
        raise InvalidInput(f"{what} name must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidInput(f"{what} name must not be empty")
    for char in value:
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            raise InvalidInput(
                f"{what} name {value!r} contains {_describe(char)}; names must be printable text"
            )
    value = unicodedata.normalize("NFC", value)
    if value != value.strip():
        raise InvalidInput(f"{what} name {value!r} must not start or end with whitespace")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidInput(f"{what} name is {len(value)} characters long; the limit is {MAX_NAME_LENGTH}")
    return value


def _describe(char: str) -> str:
    code = f"U+{ord(char):04X}"
    label = unicodedata.name(char, "")
    return f"{code} {label}".strip() if label else f"{code} (a control, format or invalid character)"


def optional_name(value: object, what: str) -> str | None:
    return None if value is None else name(value, what)


def container(value: object) -> str | None:
    if value is None:
        return None
    if not (isinstance(value, str) and _CONTAINER_NAME.fullmatch(value) and len(value) <= MAX_NAME_LENGTH):
        raise InvalidInput(
            f"container must be a Docker container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*), got {value!r}"
        )
    return value


def credential_ref(value: object, what: str = "credential_ref") -> str:
    if not isinstance(value, str) or not _CREDENTIAL_REF.fullmatch(value):
        raise InvalidInput(
            f"{what} must be a reference, 'env:VARIABLE' or 'file:/absolute/path', never the secret itself"
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
    """The message as stored: refused when absurd; else redacted, truncated, and made storable."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"message must be a str, got {type(value).__name__}")
    if len(value) > MAX_MESSAGE_LENGTH:
        raise InvalidInput(
            f"message is {len(value)} characters long; the limit is {MAX_MESSAGE_LENGTH} "
            f"(only the first {STORED_MESSAGE_LENGTH} are stored)"
        )
    # Text decoded with errors="surrogateescape" (or json.loads of a broken upstream error) may hold lone
    # surrogates, and PostgreSQL text cannot hold NUL: both become U+FFFD.
    storable = _SURROGATES.sub("\ufffd", value.replace("\x00", "\ufffd"))
    return redact(storable)[:STORED_MESSAGE_LENGTH]


def report_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH or not value.isprintable():
        raise InvalidInput(
            f"report_id must be a printable str of 1 to {MAX_NAME_LENGTH} characters, got {value!r}"
        )
    return value


def integer(value: object, what: str, *, minimum: int | None = None, maximum: int = 2**31 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidInput(f"{what} must be at least {minimum}, got {value}")
    if value > maximum or value < -(2**31):
        raise InvalidInput(f"{what} must be at most {maximum}, got {value}")
    return value


def boolean(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} must be a bool, got {value!r}")
    return value


def duration(
    value: object,
    what: str,
    *,
    minimum: timedelta = timedelta(0),
    maximum: timedelta = MAX_DURATION,
    exclusive_minimum: bool = False,
) -> timedelta:
    """A timedelta, or a number of seconds; finite and within bounds."""
    if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
        raise InvalidInput(f"{what} must be a timedelta or a number of seconds, got {value!r}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    low = minimum.total_seconds()
    if (
        not math.isfinite(seconds)
        or seconds < low
        or (exclusive_minimum and seconds == low)
        or seconds > maximum.total_seconds()
    ):
        bound = "above" if exclusive_minimum else "at least"
        raise InvalidInput(f"{what} must be {bound} {low:g} s and at most {maximum.days} days, got {value!r}")
    return timedelta(seconds=seconds)
