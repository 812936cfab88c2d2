"""Resolve credential references (``env:NAME``, ``file:/path``) to secrets, within an allowlist.

Only a drainer resolves references, right where it hands a credential to an agent's container (or a
webhook's URL to its HTTP client); the secret is returned to the caller and never logged, stored, or put
in an error message. Anyone who may write ``switcher.subscriptions`` chooses the references, so a drainer
reads only what its operator allowed: environment variables whose names start with one of
``env_prefixes`` and files whose real path lies under one of ``directories``. Anything else is refused
(``CredentialRefused``) before anything is read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CredentialError, CredentialRefused, InvalidInput

DEFAULT_ENV_PREFIXES = ("SWITCHER_CRED_",)
DEFAULT_DIRECTORIES = ("/run/secrets",)


@dataclass(frozen=True)
class CredentialPolicy:
    env_prefixes: Sequence[str] = DEFAULT_ENV_PREFIXES
    """Environment variables a reference may name start with one of these."""
    directories: Sequence[str] = DEFAULT_DIRECTORIES
    """Files a reference may name lie (after resolving symbolic links) under one of these."""

    def __post_init__(self) -> None:
        if any(not isinstance(p, str) or not p for p in self.env_prefixes):
            raise InvalidInput("credential environment prefixes must be non-empty strings")
        if any(not isinstance(d, str) or not os.path.isabs(d) for d in self.directories):
            raise InvalidInput("credential directories must be absolute paths")

    def resolve(self, reference: str) -> str:
        scheme, _, target = reference.partition(":")
        if scheme == "env":
            return self._environment(reference, target)
        if scheme == "file":
            return self._file(reference, target)
        raise CredentialRefused(f"credential reference {reference!r} is neither env:NAME nor file:/path")

    def _environment(self, reference: str, name: str) -> str:
        if not any(name.startswith(prefix) for prefix in self.env_prefixes):
            allowed = ", ".join(f"{p}*" for p in self.env_prefixes) or "none"
            raise CredentialRefused(
                f"credential {reference}: this drainer reads only environment variables named {allowed} "
                "(--credential-env-prefix)"
            )
        value = os.environ.get(name)
        if value is None:
            raise CredentialError(f"credential {reference}: environment variable {name} is not set")
        return value

    def _file(self, reference: str, path: str) -> str:
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(os.path.realpath(d)) for d in self.directories):
            allowed = ", ".join(self.directories) or "none"
            raise CredentialRefused(
                f"credential {reference}: this drainer reads only files under {allowed} (--credential-dir)"
            )
        try:
            # The resolved path, not the reference: a link swapped in after the check is not followed.
            return real.read_text(encoding="utf-8").rstrip("\n")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise CredentialError(f"credential {reference}: cannot read the file ({reason})") from None
