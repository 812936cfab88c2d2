"""A TCP proxy in front of PostgreSQL that loses the switch's replies on purpose.

Clients connect to ``127.0.0.1:<port>``; each connection is relayed to the server's Unix socket. The
proxy reads the wire protocol just far enough to recognise a call of ``switcher.handle_failure_v2`` and
the ReadyForQuery that ends it:

* client to server: after the untyped startup packet (an SSLRequest or GSSENCRequest before it is
  answered ``N`` by the proxy itself), typed messages. Parse/Bind/Describe/Execute/Close are held until
  the Sync (or any other message) that ends their batch; a batch is a *call* when it binds a statement
  whose text names ``handle_failure_v2`` (named statements are remembered, since psycopg prepares a
  query it runs often) or is a simple Query naming it.
* server to client: typed messages; each Sync or Query forwarded is answered by one ReadyForQuery ('Z').

Per call a seeded generator chooses a fault (``FaultPlan``):

* ``lose_reply``: forward the call; once its reply has arrived up to and including ReadyForQuery (the
  reports run in autocommit, so the function has committed, or failed), drop that reply and close both
  sides;
* ``cut_before``: close both sides instead of forwarding the call (nothing ran).

``force_after`` makes a fault certain in a short run: from that call number on, a mode that has not been
injected yet (and is not in flight) is chosen for every call until it has been.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL

MARKER = b"handle_failure_v2"
LOSE_REPLY = "lose_reply"
CUT_BEFORE = "cut_before"
MODES = (LOSE_REPLY, CUT_BEFORE)

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
HELD = frozenset(b"PBDEC")  # extended-protocol messages that wait for the Sync ending their batch
ANSWERED = frozenset(b"SQ")  # each of these is answered by one ReadyForQuery
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Probabilities of each fault per call of the switch, and the generator's seed."""

    lose_reply: float = 0.0
    cut_before: float = 0.0
    seed: int = 0
    force_after: dict[str, int] = field(default_factory=dict)
    """mode -> call number from which that mode is forced until it has been injected once."""


class _Closed(Exception):
    """The link was closed on purpose (a fault), or by a peer."""


def socket_path(url: URL) -> str:
    """The Unix socket of a server whose URL names its socket directory (``?host=/dir``)."""
    host = url.query["host"]
    directory = host if isinstance(host, str) else host[0]
    return str(Path(directory) / f".s.PGSQL.{url.port or 5432}")


class PgProxy:
    """``with PgProxy(upstream_url, plan) as proxy:`` -- ``proxy.url`` is what clients connect to."""

    def __init__(self, upstream: URL, plan: FaultPlan, *, database: str = "postgres") -> None:
        self.upstream = socket_path(upstream)
        self.plan = plan
        self._rng = random.Random(plan.seed)
        self._lock = threading.Condition()
        self.calls = 0
        """Calls of the switch seen (every attempt, retries included)."""
        self.injected: Counter[str] = Counter()
        self.lost_errors = 0
        """Lost replies that carried an error (the call committed nothing)."""
        self._in_flight: Counter[str] = Counter()
        self._links: set[_Link] = set()
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"postgresql://{upstream.username or 'postgres'}@127.0.0.1:{self.port}/{database}"
        self._acceptor = threading.Thread(target=self._accept, name="pgproxy-accept", daemon=True)

    def start(self) -> PgProxy:
        self._acceptor.start()
        return self

    def __enter__(self) -> PgProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links = list(self._links)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for link in links:
            link.close()
        self._acceptor.join(timeout=10)
        for link in links:
            link.join()

    def wait_for_calls(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` calls have been seen (or ``timeout`` seconds); whether they have."""
        with self._lock:
            return self._lock.wait_for(lambda: self.calls >= count, timeout)

    def figures(self) -> dict[str, int]:
        with self._lock:
            return {
                "calls": self.calls,
                **{m: self.injected[m] for m in MODES},
                "lost_errors": self.lost_errors,
            }

    # -- used by the links -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.upstream)
            except OSError:  # the server is down (restarting): the client sees the connection close
                upstream.close()
                client.close()
                continue
            link = _Link(self, client, upstream)
            with self._lock:
                if self._closed:
                    link.close()
                    return
                self._links.add(link)
            link.start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _decide(self) -> str | None:
        """The fault for the next call of the switch (None: none)."""
        with self._lock:
            self.calls += 1
            draw = self._rng.random()  # one draw per call, whatever is forced: the sequence stays seeded
            fault: str | None = None
            for mode, after in self.plan.force_after.items():
                if self.calls >= after and self.injected[mode] == 0 and self._in_flight[mode] == 0:
                    fault = mode
                    break
            if fault is None:
                if draw < self.plan.lose_reply:
                    fault = LOSE_REPLY
                elif draw < self.plan.lose_reply + self.plan.cut_before:
                    fault = CUT_BEFORE
            if fault == CUT_BEFORE:
                self.injected[CUT_BEFORE] += 1
            elif fault == LOSE_REPLY:
                self._in_flight[LOSE_REPLY] += 1
            self._lock.notify_all()
            return fault

    def _resolve_lost(self, *, injected: bool, error: bool = False) -> None:
        with self._lock:
            self._in_flight[LOSE_REPLY] -= 1
            if injected:
                self.injected[LOSE_REPLY] += 1
                self.lost_errors += error


class _Link:
    """One client connection and its upstream connection: a thread per direction."""

    def __init__(self, proxy: PgProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._closed = False
        self._replies: deque[bool] = deque()  # per ReadyForQuery expected: drop the reply it ends?
        self._statements: set[bytes] = set()  # prepared statements (b"" unnamed) that call the switch
        self._held: list[bytes] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self._from_client,), daemon=True),
            threading.Thread(target=self._pump, args=(self._from_server,), daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=10)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            unresolved = sum(self._replies)
            self._replies.clear()
        for _ in range(unresolved):
            self.proxy._resolve_lost(injected=False)
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.proxy._forget(self)

    def _pump(self, body: Callable[[], None]) -> None:
        try:
            body()
        except (OSError, _Closed):
            pass
        finally:
            self.close()

    # -- client to server --------------------------------------------------------------------------

    def _from_client(self) -> None:
        buffer = bytearray()
        started = False
        while data := self.client.recv(65536):
            buffer += data
            while True:
                if not started:
                    if len(buffer) < 8 or len(buffer) < int.from_bytes(buffer[:4], "big"):
                        break
                    length = int.from_bytes(buffer[:4], "big")
                    packet = bytes(buffer[:length])
                    del buffer[:length]
                    code = int.from_bytes(packet[4:8], "big")
                    if code in (SSL_REQUEST, GSSENC_REQUEST):
                        self.client.sendall(b"N")  # no encryption here: the client goes on in the clear
                        continue
                    if code != CANCEL_REQUEST:
                        started = True
                        with self._lock:
                            self._replies.append(False)  # the startup ends in a ReadyForQuery
                    self.upstream.sendall(packet)
                    continue
                if len(buffer) < 5 or len(buffer) < 1 + int.from_bytes(buffer[1:5], "big"):
                    break
                end = 1 + int.from_bytes(buffer[1:5], "big")
                message = bytes(buffer[:end])
                del buffer[:end]
                self._client_message(message)

    def _client_message(self, message: bytes) -> None:
        self._held.append(message)
        if message[0] in HELD:
            return
        batch, self._held = self._held, []
        fault = self.proxy._decide() if self._is_call(batch) else None
        if fault == CUT_BEFORE:
            raise _Closed
        answered = sum(1 for m in batch if m[0] in ANSWERED)
        with self._lock:
            closed = self._closed
            if not closed:
                for i in range(answered):
                    self._replies.append(fault == LOSE_REPLY and i == answered - 1)
        if fault == LOSE_REPLY and (closed or not answered):  # nothing will end it: not in flight
            self.proxy._resolve_lost(injected=False)
        if closed:
            raise _Closed
        self.upstream.sendall(b"".join(batch))

    def _is_call(self, batch: list[bytes]) -> bool:
        call = False
        for message in batch:
            kind, body = message[0], message[5:]
            if kind == ord("P"):  # Parse: name \0 query \0 ...
                name, _, rest = body.partition(b"\0")
                query = rest.partition(b"\0")[0]
                if MARKER in query:
                    self._statements.add(name)
                else:
                    self._statements.discard(name)
            elif kind == ord("B"):  # Bind: portal \0 statement \0 ...
                statement = body.partition(b"\0")[2].partition(b"\0")[0]
                call = call or statement in self._statements
            elif kind == ord("C") and body[:1] == b"S":  # Close of a statement
                self._statements.discard(body[1:].partition(b"\0")[0])
            elif kind == ord("Q"):
                call = call or MARKER in body
        return call

    # -- server to client --------------------------------------------------------------------------

    def _from_server(self) -> None:
        buffer = bytearray()
        dropped_error = False
        while data := self.upstream.recv(65536):
            buffer += data
            out = bytearray()
            while len(buffer) >= 5 and len(buffer) >= 1 + int.from_bytes(buffer[1:5], "big"):
                end = 1 + int.from_bytes(buffer[1:5], "big")
                message = bytes(buffer[:end])
                del buffer[:end]
                with self._lock:
                    drop = bool(self._replies) and self._replies[0]
                    if message[0] == READY_FOR_QUERY and self._replies:
                        self._replies.popleft()
                if not drop:
                    out += message
                    continue
                dropped_error = dropped_error or message[0] == ERROR_RESPONSE
                if message[0] == READY_FOR_QUERY:  # the call is over (committed): lose its reply
                    if out:
                        self.client.sendall(out)
                    self.proxy._resolve_lost(injected=True, error=dropped_error)
                    raise _Closed
            if out:
                self.client.sendall(out)
