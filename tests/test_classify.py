from __future__ import annotations

import pytest

from switcher import FailureKind, classify_failure

RL, AUTH = FailureKind.RATE_LIMIT, FailureKind.AUTH


@pytest.mark.parametrize(
    ("message", "status", "expected"),
    [
        ("", 429, RL),
        ("anything", 401, AUTH),
        ("", 402, AUTH),
        ("", 403, AUTH),
        ("Error: 429 Too Many Requests", None, RL),
        ("rate_limit_error: Number of requests has exceeded your rate limit", None, RL),
        ("You have reached your usage limit", None, RL),
        ("Your credit balance is too low to access the API", None, AUTH),
        ("OAuth token has expired. Please obtain a new token", None, AUTH),
        ("authentication_error: invalid x-api-key", None, AUTH),
        ("Invalid API key provided", None, AUTH),
        ("Process killed by SIGTERM", None, None),
        ("container OOM killed (exit code 137)", None, None),
        ("worker terminated; authentication step never ran", None, None),
        ("SIGKILL received while refreshing token expired credentials", None, None),
        ("killed", 403, None),
        ("out of memory", 429, RL),
        ("connection reset by peer", None, None),
        ("", 500, None),
        (None, None, None),
    ],
)
def test_classify_failure(message: str | None, status: int | None, expected: FailureKind | None) -> None:
    assert classify_failure(message, status) is expected
