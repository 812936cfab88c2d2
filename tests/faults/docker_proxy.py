"""A fault-injecting proxy in front of the Docker Engine API, for tests.

``DockerProxy`` listens on a Unix socket of its own and forwards every connection to the real Docker
socket, byte for byte, from threads of the test process. It reads each request's head and body
boundaries (``Content-Length`` or chunked) on the client side, so it knows the method and path of every
request on a keep-alive connection; responses are piped back as they come. A request that upgrades the
connection (``docker exec`` with ``socket=True`` sends ``Connection: Upgrade``) turns the connection into
a raw pipe both ways; a half-close (shutdown of the write side) is passed on in both directions.

The test places faults with one-shot rules, matched on the method and the path after the API version
prefix (``/v1.47/containers/x/stop`` is matched as ``/containers/x/stop``):

* ``hold(method, pattern)``: the next matching request is not forwarded. ``reached`` is set; the test
  then ``drop()``s it (the client's connection is closed: Docker never sees the call) or ``release()``s it
  (forwarded as it came).
* ``notify(method, pattern)``: the next matching request is forwarded; ``reached`` is set once all of it
  went to Docker.

Each rule records the request that reached it, with the pid of the process that sent it (``SO_PEERCRED``)
so that the test can kill exactly that process. ``unreachable = True`` makes Docker go away: every new
connection is closed at once and existing ones are cut (held requests with them); ``False`` brings it back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DOCKER_SOCKET = "/var/run/docker.sock"
_VERSION_PREFIX = re.compile(r"^/v\d+(?:\.\d+)*(?=/)")
_MAX_HEAD = 1 << 20


class ProtocolError(Exception):
    """The client sent something that is not an HTTP/1.1 request the proxy understands."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the proxy saw it: who sent it, and what."""

    pid: int
    method: str
    path: str
    """Without the API version prefix and without the query string."""
    target: str
    """The request target as sent (version prefix and query string included)."""


class Rule:
    """A one-shot rule: matches the next request with ``method`` whose path matches ``pattern`` in full."""

    def __init__(self, kind: Literal["hold", "notify"], method: str, pattern: str) -> None:
        self.kind = kind
        self.method = method.upper()
        self.pattern = re.compile(pattern)
        self.reached = threading.Event()
        """Set when a request matched: held (``hold``), or forwarded in full (``notify``)."""
        self.request: Request | None = None
        self._decided = threading.Event()
        self._decision: Literal["release", "drop"] | None = None
        self.outcome: str | None = None
        """What became of the request: ``held``, ``released``, ``dropped``, ``cut`` or ``forwarded``."""

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.pattern.fullmatch(path) is not None

    @property
    def pid(self) -> int:
        """The pid of the process whose request reached the rule."""
        assert self.request is not None, "the rule was not reached"
        return self.request.pid

    def wait(self, timeout: float = 60.0) -> Request:
        """Wait until a request reaches the rule; that request."""
        if not self.reached.wait(timeout):
            raise AssertionError(f"no {self.method} {self.pattern.pattern} reached the proxy in {timeout} s")
        assert self.request is not None
        return self.request

    def release(self) -> None:
        """Forward the held request."""
        self._decide("release")

    def drop(self) -> None:
        """Close the held request's connection: Docker never sees it. Harmless when nothing is held."""
        self._decide("drop")

    def _decide(self, decision: Literal["release", "drop"]) -> None:
        if self._decision is None:
            self._decision = decision
        self._decided.set()

    def __repr__(self) -> str:
        return f"<{self.kind} {self.method} {self.pattern.pattern}: {self.outcome or 'armed'}>"


class _Connection:
    """A client connection and its upstream connection to Docker."""

    def __init__(self, client: socket.socket, upstream: socket.socket, pid: int) -> None:
        self.client = client
        self.upstream = upstream
        self.pid = pid
        self.cut_off = threading.Event()

    def cut(self) -> None:
        """Shut both sockets down: every thread blocked on them wakes up; they are closed by their owner."""
        self.cut_off.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Reader:
    """Buffered reads from the client socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def until(self, delimiter: bytes, limit: int = _MAX_HEAD) -> bytes | None:
        """Bytes up to and including ``delimiter``; None on a clean end of stream before any byte."""
        while (index := self.buffer.find(delimiter)) < 0:
            if len(self.buffer) > limit:
                raise ProtocolError("request head too long")
            if not self._fill():
                if self.buffer:
                    raise ProtocolError("connection closed in the middle of a request")
                return None
        end = index + len(delimiter)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    def forward(self, size: int, out: socket.socket) -> None:
        """Send exactly ``size`` bytes of the stream to ``out``."""
        while size > 0:
            if not self.buffer and not self._fill():
                raise ProtocolError("connection closed in the middle of a request body")
            chunk = bytes(self.buffer[:size])
            del self.buffer[: len(chunk)]
            out.sendall(chunk)
            size -= len(chunk)

    def forward_chunked(self, out: socket.socket) -> None:
        """Send one chunked body (chunks, the last chunk and the trailers) to ``out``."""
        while True:
            line = self.until(b"\r\n", limit=4096)
            if line is None:
                raise ProtocolError("connection closed in the middle of a chunked body")
            out.sendall(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            self.forward(size + 2, out)  # the chunk and its CRLF
        while True:  # trailers, up to an empty line
            line = self.until(b"\r\n", limit=_MAX_HEAD)
            if line is None:
                raise ProtocolError("connection closed in the trailers of a chunked body")
            out.sendall(line)
            if line == b"\r\n":
                return


def _peer_pid(sock: socket.socket) -> int:
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", credentials)
    return int(pid)


def _headers(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        raise ProtocolError(f"not a request line: {lines[0]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return method.upper(), target, headers


def api_path(target: str) -> str:
    """The path of a request target, without the query string and the API version prefix."""
    return _VERSION_PREFIX.sub("", urlsplit(target).path, count=1)


class DockerProxy:
    def __init__(self, path: str | Path, upstream: str = DOCKER_SOCKET) -> None:
        self.path = str(path)
        self.upstream = upstream
        self.requests: list[Request] = []
        """Every request forwarded to Docker, in order."""
        self._rules: list[Rule] = []
        self._connections: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._unreachable = False
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """What ``DockerConfig(base_url=...)`` or ``DOCKER_HOST`` takes."""
        return f"unix://{self.path}"

    # -- life ------------------------------------------------------------------------------------------

    def start(self) -> DockerProxy:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(128)
        listener.settimeout(0.1)  # so that the accepting thread notices close()
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, name="docker-proxy-accept", daemon=True)
        self._acceptor.start()
        return self

    def close(self) -> None:
        """Stop accepting, drop held requests, cut every connection, and wait for the threads."""
        self._closed.set()
        with self._lock:
            rules, self._rules = list(self._rules), []
            connections = list(self._connections)
            threads = list(self._threads)
        for rule in rules:
            rule.drop()
        for connection in connections:
            connection.cut()
        if self._acceptor is not None:
            self._acceptor.join(10)
        for thread in threads:
            thread.join(10)
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> DockerProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- rules -----------------------------------------------------------------------------------------

    def hold(self, method: str, pattern: str) -> Rule:
        """Hold the next matching request (not forwarded) until ``release()`` or ``drop()``."""
        return self._add(Rule("hold", method, pattern))

    def notify(self, method: str, pattern: str) -> Rule:
        """Forward the next matching request, then set ``reached``."""
        return self._add(Rule("notify", method, pattern))

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> list[Rule]:
        """Disarm the rules no request reached yet, and drop requests still held; the disarmed rules."""
        with self._lock:
            armed, self._rules = list(self._rules), []
        for rule in armed:
            rule.drop()
        return armed

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path):
                    self._rules.remove(rule)
                    return rule
        return None

    @property
    def unreachable(self) -> bool:
        return self._unreachable

    @unreachable.setter
    def unreachable(self, on: bool) -> None:
        """While on, Docker is away: new connections are closed at once, and existing ones are cut now."""
        self._unreachable = on
        if on:
            self.cut()

    def cut(self) -> None:
        """Cut every open connection now (new ones still go through, unless Docker is unreachable)."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.cut()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        self.unreachable = True
        try:
            yield
        finally:
            self.unreachable = False

    def count(self, method: str, pattern: str) -> int:
        """How many forwarded requests matched."""
        compiled = re.compile(pattern)
        with self._lock:
            return sum(r.method == method and compiled.fullmatch(r.path) is not None for r in self.requests)

    # -- connections -----------------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(target, *args), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return thread

    def _run(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except Exception:
            log.exception("docker proxy thread failed")
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                raise
            client.settimeout(None)
            if self._unreachable or self._closed.is_set():
                client.close()
                continue
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        pid = _peer_pid(client)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.upstream)
        except OSError:
            upstream.close()
            client.close()
            return
        connection = _Connection(client, upstream, pid)
        with self._lock:
            self._connections.add(connection)
        if self._unreachable:  # it went away while this connection was being made
            connection.cut()
        pump = self._spawn(self._pump, connection)
        try:
            self._requests(connection)
        except (OSError, ProtocolError, ValueError) as error:
            if not connection.cut_off.is_set():
                log.debug("docker proxy: connection of pid %d ends: %s", pid, error)
            connection.cut()
        finally:
            pump.join()
            with self._lock:
                self._connections.discard(connection)
            client.close()
            upstream.close()

    def _pump(self, connection: _Connection) -> None:
        """Docker to client, as it comes; Docker's end of stream becomes the client's."""
        try:
            while data := connection.upstream.recv(65536):
                connection.client.sendall(data)
            connection.client.shutdown(socket.SHUT_WR)
        except OSError:
            connection.cut()

    def _requests(self, connection: _Connection) -> None:
        """Client to Docker, one request at a time, each matched against the rules."""
        reader = _Reader(connection.client)
        upstream = connection.upstream
        while True:
            head = reader.until(b"\r\n\r\n")
            if head is None:  # the client is done sending: pass the half-close on
                upstream.shutdown(socket.SHUT_WR)
                return
            method, target, headers = _headers(head)
            request = Request(connection.pid, method, api_path(target), target)
            rule = self._match(request.method, request.path)
            if rule is not None:
                rule.request = request
            if rule is not None and rule.kind == "hold":
                rule.outcome = "held"
                rule.reached.set()
                if not self._await(rule, connection):
                    rule.outcome = "cut" if connection.cut_off.is_set() else "dropped"
                    connection.cut()
                    return
                rule.outcome = "released"
            upstream.sendall(head)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                reader.forward_chunked(upstream)
            else:
                reader.forward(int(headers.get("content-length", "0") or 0), upstream)
            with self._lock:
                self.requests.append(request)
            if rule is not None and rule.kind == "notify":
                rule.outcome = "forwarded"
                rule.reached.set()
            tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
            if "upgrade" in tokens or "upgrade" in headers:
                self._raw(reader, connection)
                return

    def _await(self, rule: Rule, connection: _Connection) -> bool:
        """Wait for the test's decision on a held request: True to forward it."""
        while not rule._decided.wait(0.05):
            if connection.cut_off.is_set() or self._closed.is_set():
                return False
        return rule._decision == "release" and not connection.cut_off.is_set()

    @staticmethod
    def _raw(reader: _Reader, connection: _Connection) -> None:
        """After an upgrade: client to Docker as raw bytes; the client's half-close becomes Docker's."""
        if reader.buffer:
            connection.upstream.sendall(bytes(reader.buffer))
            reader.buffer.clear()
        while data := connection.client.recv(65536):
            connection.upstream.sendall(data)
        connection.upstream.shutdown(socket.SHUT_WR)
