"""Resolve credential references (``env:NAME``, ``file:/path``) to secrets.

Only the drainer calls this, right where it (re)creates a container. The secret is returned to the
caller and never logged, stored, or put in an error message.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SwitcherError


class CredentialError(SwitcherError):
    """A credential reference cannot be resolved here (the message names the reference, not a secret)."""


def resolve(reference: str) -> str:
    scheme, _, target = reference.partition(":")
    if scheme == "env":
        value = os.environ.get(target)
        if value is None:
            raise CredentialError(f"credential {reference}: environment variable {target} is not set")
        return value
    if scheme == "file":
        try:
            return Path(target).read_text().rstrip("\n")
        except OSError as error:
            raise CredentialError(
                f"credential {reference}: cannot read the file ({error.strerror})"
            ) from None
    raise CredentialError(f"credential reference {reference!r} is neither env:NAME nor file:/path")
