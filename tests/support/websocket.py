"""
A hand-rolled blocking WebSocket client (RFC 6455) over a plain socket, for
the cases a well-behaved client never makes: bad handshakes, oversized or
malformed frames, a client that never answers pings or stops reading.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def text(self) -> str:
        return self.payload.decode()

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


def frame_bytes(opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    """One frame as a client sends it (masked)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload, key)
    return head + key + masked


def _mask_fast(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


class WebSocketClient:
    """
    A connection to ``url`` (``ws://`` or ``wss://``, with ``cafile`` for the
    latter). :meth:`handshake` sends the upgrade and returns the status and
    headers; ``extra`` replaces or adds headers (``None`` leaves one out).
    """

    def __init__(self, url: str, cafile: str | None = None, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "wss" else 80)
        self.path = parts.path or "/"
        if parts.query:
            self.path += "?" + parts.query
        self.netloc = parts.netloc
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if parts.scheme == "wss":
            context = ssl.create_default_context(cafile=cafile)
            context.check_hostname = False
            context.set_alpn_protocols(["http/1.1"])
            sock = context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
        self.buffer = b""

    def handshake(
        self, extra: dict[str, str | None] | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        headers: dict[str, str | None] = {
            "Host": self.netloc,
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        }
        headers.update(extra or {})
        lines = [f"{method} {self.path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers.items() if v is not None]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *rest = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        found = {}
        for line in rest:
            name, _, value = line.partition(":")
            found[name.strip().lower()] = value.strip()
        body = b""
        if status != 101 and "content-length" in found:
            n = int(found["content-length"])
            while len(self.buffer) < n:
                self._fill()
            body, self.buffer = self.buffer[:n], self.buffer[n:]
        return status, found, body

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self.buffer += data

    def send(self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> None:
        self.sock.sendall(frame_bytes(opcode, payload, fin, mask))

    def send_text(self, text: str) -> None:
        self.send(TEXT, text.encode())

    def send_binary(self, data: bytes) -> None:
        self.send(BINARY, data)

    def close(self, code: int = 1000) -> None:
        self.send(CLOSE, struct.pack("!H", code))

    def _need(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def recv(self, answer_pings: bool = True) -> Frame:
        """The next frame (pings answered and skipped unless ``answer_pings`` is false)."""
        while True:
            b1, b2 = self._need(2)
            n = b2 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._need(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._need(8))[0]
            payload = self._need(n)
            frame = Frame(b1 & 0x0F, payload, bool(b1 & 0x80))
            if frame.opcode == PING and answer_pings:
                self.send(PONG, payload)
                continue
            return frame

    def messages_until_close(self, limit: int = 10000) -> tuple[list[Frame], Frame]:
        """Every frame up to the close frame, and the close frame."""
        got = []
        for _ in range(limit):
            frame = self.recv()
            if frame.opcode == CLOSE:
                return got, frame
            got.append(frame)
        raise AssertionError("no close frame")

    def closed_by_peer(self) -> bool:
        """Whether the server closed the TCP connection (reads until EOF or a timeout)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def shutdown(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
