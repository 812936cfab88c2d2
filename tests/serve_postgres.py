"""A throwaway embedded PostgreSQL for shell scripts: prints its URL, serves until stdin closes.

exec 3< <(.venv/bin/python tests/serve_postgres.py); read -r url <&3
"""

from __future__ import annotations

import sys

from switcher.testing import embedded_server

with embedded_server() as server:
    print(server.url.render_as_string(hide_password=False), flush=True)
    sys.stdin.read()
