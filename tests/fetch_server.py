"""A loopback HTTP server for the fetch tests and benchmark, with switchable misbehaviour.

Each served path has a `Spec`: its body (bytes, or a file sent with sendfile), and what to do
wrong: fail with 503 `fail` times, drop the connection half-way `drop` times, ignore Range,
stall before answering, trickle the body slowly, or redirect elsewhere. Every request is logged in
`server.log`.
Run as `python tests/fetch_server.py ROOT` to serve a folder (prints the port; used by bench).
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Spec:
    body: bytes | Path
    fail: int = 0  # answer 503 this many times first
    drop: int = 0  # cut the connection half-way through the body this many times
    ignore_range: bool = False
    stall: float = 0.0  # seconds to wait before answering
    trickle: float = 0.0  # seconds to wait between 64 KiB pieces of the body
    etag: str = field(default="")
    redirect: str = ""  # answer 302 to this URL instead

    def size(self) -> int:
        return self.body.stat().st_size if isinstance(self.body, Path) else len(self.body)


@dataclass
class Request:
    method: str
    path: str  # with the query string, as received
    range: str | None
    status: int
    sent: int  # body bytes sent


class FetchServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.specs: dict[str, Spec] = {}
        self.root = root
        self.log: list[Request] = []
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, path: str, body: bytes, **kwargs) -> str:
        """Serve `body` at `path`; return the URL."""
        etag = kwargs.pop("etag", None) or f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        self.specs[path] = Spec(body, etag=etag, **kwargs)
        return self.base + path

    def body_gets(self, path: str) -> list[Request]:
        """GETs of `path` that sent body bytes."""
        return [r for r in self.log if r.method == "GET" and urlsplit(r.path).path == path and r.sent]

    def spec(self, path: str) -> Spec | None:
        if path in self.specs:
            return self.specs[path]
        if self.root and (self.root / path.lstrip("/")).is_file():
            file = self.root / path.lstrip("/")
            st = file.stat()
            return Spec(file, etag=f'"{st.st_size:x}-{st.st_mtime_ns:x}"')
        return None

    def __enter__(self) -> FetchServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FetchServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _record(self, status: int, sent: int) -> None:
        with self.server.lock:
            self.server.log.append(Request(self.command, self.path, self.headers.get("Range"), status, sent))

    def _answer(self, head: bool) -> None:
        spec = self.server.spec(urlsplit(self.path).path)
        if spec is None:
            return self._status(404, "Not Found")
        if spec.stall:
            time.sleep(spec.stall)
        if spec.redirect:
            self._record(302, 0)
            self.send_response(302)
            self.send_header("Location", spec.redirect)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if spec.fail and not head:
            with self.server.lock:
                spec.fail -= 1
            return self._status(503, "Service Unavailable")
        size, start = spec.size(), 0
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        partial = rng and not spec.ignore_range and (if_range is None or if_range == spec.etag)
        if partial:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self._record(416, 0)
                return self.end_headers()
        if head:
            self._record(200, 0)
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.send_header("ETag", spec.etag)
        if not spec.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head:
            return
        end = size
        if spec.drop:
            with self.server.lock:
                spec.drop -= 1
            end = start + (size - start) // 2
        # Logged before sending, so the client never sees the end of a body that is not logged yet.
        self._record(206 if partial else 200, end - start)
        self._send_body(spec, start, end)
        if end != size:  # cut off: close without the rest of the promised Content-Length
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_body(self, spec: Spec, start: int, end: int) -> None:
        try:
            if isinstance(spec.body, Path) and not spec.trickle:
                with open(spec.body, "rb") as f:
                    self.connection.sendfile(f, start, end - start)
                return
            data = spec.body if isinstance(spec.body, bytes) else spec.body.read_bytes()
            for pos in range(start, end, 1 << 16):
                self.wfile.write(data[pos : min(pos + (1 << 16), end)])
                if spec.trickle:
                    time.sleep(spec.trickle)
        except OSError:
            self.close_connection = True  # the client went away (e.g. its read timeout)

    def _status(self, code: int, reason: str) -> None:
        self._record(code, 0)
        body = f"{code} {reason}\n".encode()
        self.send_response(code, reason)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


if __name__ == "__main__":
    server = FetchServer(Path(sys.argv[1]))
    print(server.server_address[1], flush=True)
    server.serve_forever()  # until the parent terminates this process
