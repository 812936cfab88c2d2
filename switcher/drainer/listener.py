"""The listener: a dedicated connection that LISTENs for the outbox's NOTIFY and wakes the drain loop.

Notifications sent while it is disconnected are lost, so it also wakes the loop after every (re)connect;
the loop then claims whatever is due. Polling remains the fallback. It needs a real session: point
drainers straight at PostgreSQL (or a session-pooling proxy), or run them with ``listen=False``.
"""

from __future__ import annotations

import logging
import threading

import psycopg
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from .config import Backoff

log = logging.getLogger(__name__)


class Listener:
    def __init__(
        self, engine: Engine, channel: str, wake: threading.Event, stopping: threading.Event, backoff: Backoff
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.wake = wake
        self.stopping = stopping
        self.backoff = backoff
        self.listening = threading.Event()
        """Set while the LISTEN connection is up (tests and health checks wait on it)."""

    def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                # A connection of the engine's own (its URL, password and connect arguments), never
                # given back to the pool: a LISTENing session is of no use to anyone else.
                pooled = self.engine.raw_connection()
                try:
                    conn = pooled.driver_connection
                    assert isinstance(conn, psycopg.Connection)
                    conn.autocommit = True
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.listening.set()
                    self.wake.set()  # whatever was notified while we were away
                    failures = 0
                    while not self.stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.wake.set()
                finally:
                    pooled.invalidate()
            except (psycopg.Error, DBAPIError) as error:
                self.listening.clear()
                failures += 1
                delay = self.backoff.delay(failures).total_seconds()
                log.warning("LISTEN connection lost (%s); reconnecting in %.1f s", error, delay)
                self.stopping.wait(delay)
        self.listening.clear()
