"""Take secrets out of text before it is stored or logged.

Failure messages come from upstream errors, and upstream errors quote headers, URLs and request bodies.
What looks like a credential is replaced by ``[redacted]``: bearer and basic credentials, ``sk-``-style
API keys, ``api_key=…``/``token: …``-style assignments, and passwords in URLs.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # A bearer token has digits somewhere; "bearer credentials expired" is prose, not a token.
    (re.compile(r"(?i)\b(bearer\s+)(?=[A-Za-z._~+/=-]*[0-9])[A-Za-z0-9._~+/=-]{8,}"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b(authorization\s*:\s*basic\s+)[A-Za-z0-9+/=]{4,}"), rf"\1{REDACTED}"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), f"sk-{REDACTED}"),
    (
        re.compile(
            r"(?i)\b((?:x-)?api[_-]?key|access[_-]?token|refresh[_-]?token|auth[_-]?token|client[_-]?secret"
            r"|secret|password|passwd|pwd)(\"?\s*[=:]\s*\"?)[^\s\"'&,;]+"
        ),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@"), rf"\1{REDACTED}@"),
)


def redact(text: str) -> str:
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text
