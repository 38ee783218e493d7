"""A minimal Redis reader for the command line's read paths: RESP2 over one socket, commands
pipelined, replies parsed; no redis-py (whose import alone costs more than ``buildq status`` may).

Only plain ``redis://`` URLs (host, port, DB, user and password); anything else — Sentinel, TLS,
a Unix socket — is :data:`None` from :func:`open_url`, and the caller takes the full path.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import BuildqError

Reply = Any


class ReplyError(BuildqError):
    """Redis answered a command with an error."""


class RespConnection:
    """One connection; :meth:`pipeline` sends commands in one write and reads their replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    def pipeline(self, *commands: tuple[str | bytes, ...]) -> list[Reply]:
        """The replies of ``commands``, in order (an error reply is a :class:`ReplyError` in the list)."""
        out = bytearray()
        for command in commands:
            out += b"*%d\r\n" % len(command)
            for part in command:
                data = part if isinstance(part, bytes) else str(part).encode()
                out += b"$%d\r\n%s\r\n" % (len(data), data)
        self.sock.sendall(out)
        return [self._reply() for _ in commands]

    def _reply(self) -> Reply:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.reader.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"not a Redis reply: {line[:40]!r}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def open_url(url: str, *, timeout_s: float = 10.0) -> RespConnection | None:
    """A connection to the Redis of a plain ``redis://`` URL, authenticated and on its DB; None for
    any other kind of URL. Raises ``OSError`` when Redis cannot be reached, :class:`ReplyError`
    when it refuses the login or the DB."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        return None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        return None
    sock = socket.create_connection((parts.hostname, parts.port or 6379), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = RespConnection(sock)
    setup: list[tuple[str, ...]] = []
    if parts.password is not None:
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password)
        setup.append(("AUTH", user, password) if user else ("AUTH", password))
    if path and path != "0":
        setup.append(("SELECT", path))
    for reply in conn.pipeline(*setup) if setup else ():
        if isinstance(reply, ReplyError):
            conn.close()
            raise reply
    return conn
