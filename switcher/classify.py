"""Map an error (HTTP status and/or text) to the FailureKind that warrants a switch, or None."""

from __future__ import annotations

import re

from .model import FailureKind

_STATUS = {
    429: FailureKind.RATE_LIMIT,
    401: FailureKind.AUTH,
    402: FailureKind.AUTH,
    403: FailureKind.AUTH,
}

# A process that was killed is not a credential problem, whatever else its log says.
_KILLED = re.compile(
    r"\b(sig(term|kill|int)|killed|oom|out of memory|exit (code|status) (137|143)|signal 9|"
    r"(process|container|worker) (was )?terminated)\b",
    re.IGNORECASE,
)
_RATE_LIMIT = re.compile(
    r"\b(429|rate[ _-]?limit(ed)?|too many requests|usage limit|quota exceeded|resource[_ ]exhausted)\b",
    re.IGNORECASE,
)
_AUTH = re.compile(
    r"\b(401|402|403|unauthori[sz]ed|forbidden|authentication|invalid (api|x-api)[ -]?key|"
    r"credit balance|insufficient (credits?|funds|quota)|billing|payment required|"
    r"(token|credentials?|session|subscription) (has )?(expired|revoked|invalid)|"
    r"invalid (token|credentials?)|oauth)\b",
    re.IGNORECASE,
)


def classify_failure(message: str | None, status: int | None = None) -> FailureKind | None:
    """Return the kind of failure that should move an agent, or None when it should not.

    A status code decides when it is one of 429 (rate limit) or 401/402/403 (auth). Otherwise the text
    decides: rate-limit wording first, then auth wording. A message that reports the process being
    killed (SIGTERM/SIGKILL, OOM, exit 137/143) is never called an auth failure.
    """
    text = message or ""
    killed = bool(_KILLED.search(text))
    by_status = _STATUS.get(status) if status is not None else None
    if by_status is FailureKind.RATE_LIMIT:
        return by_status
    if by_status is FailureKind.AUTH:
        return None if killed else by_status
    if _RATE_LIMIT.search(text):
        return FailureKind.RATE_LIMIT
    if not killed and _AUTH.search(text):
        return FailureKind.AUTH
    return None
