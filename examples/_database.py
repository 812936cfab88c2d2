"""The database the examples use: SWITCHER_DATABASE_URL, or a throwaway embedded server."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    if url := os.environ.get("SWITCHER_DATABASE_URL"):
        yield url
        return
    from switcher.testing import embedded_server  # needs switcher[embedded]

    with embedded_server() as server:
        yield server.url.render_as_string(hide_password=False)
