"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (stdlib only, thread per connection).

Requests are forwarded unchanged (Host header included, so SigV4 signatures stay valid) unless a fault is
armed: `refuse_connections(s)` closes the listening socket (and open connections) for `s` seconds,
`fail_next(k, ...)` answers the next k requests with an S3 error (503 SlowDown, 500 InternalError),
`drop_next(k)` forwards them but cuts the connection mid-response (half the body; no answer at all when there
is no body). Every request that reaches the proxy is recorded, so tests can count attempts.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
              "proxy-connection", "proxy-authorization", "proxy-authenticate"}  # fmt: skip
IDLE_TIMEOUT_S = 30.0  # an idle client connection is closed after this: every handler loop ends


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    fault: str | None  # None (forwarded), "error", "drop" or "key_error"


@dataclass
class _Fault:
    kind: str  # "error", "drop" or "key_error"
    remaining: int
    method: str | None
    status: int = 0
    code: str = ""
    skip: int = 0  # matching requests let through untouched before the fault applies


class FaultProxy:
    """Start with `start()` (or as a context manager); `endpoint` is the URL to give boto3."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname != "127.0.0.1" or not parts.port:
            raise ValueError(f"upstream {upstream!r}: expected http://127.0.0.1:<port>")
        self.upstream = (parts.hostname, parts.port)
        self.port = 0
        self.requests: list[Request] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._server_thread: threading.Thread | None = None
        self._relisten: threading.Timer | None = None
        self._connections: set[socket.socket] = set()
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        """Stops listening, cuts open connections; the proxy's threads then end (all are daemons)."""
        with self._lock:
            self._stopped = True
            if self._relisten is not None:
                self._relisten.cancel()
        self._close_listener()
        self._cut_connections()

    def _listen(self) -> None:
        with self._lock:
            if self._stopped or self._server is not None:
                return
            server = _Server(("127.0.0.1", self.port), _Handler)
            server.proxy = self
            self.port = server.server_address[1]
            self._server = server
            self._server_thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
            )
            self._server_thread.start()

    def _close_listener(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _cut_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # -- faults ---------------------------------------------------------------------------------------------

    def refuse_connections(self, seconds: float) -> None:
        """Connections are refused (nothing listens on the port) for `seconds`, then accepted again."""
        self._close_listener()
        self._cut_connections()  # pooled keep-alive connections must not bypass the outage
        with self._lock:
            if self._relisten is not None:
                self._relisten.cancel()
            self._relisten = threading.Timer(seconds, self._listen)
            self._relisten.daemon = True
            self._relisten.start()

    def wait_listening(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.listening:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fault proxy on port {self.port} is not listening after {timeout_s}s")
            time.sleep(0.02)

    def fail_next(
        self, count: int, status: int = 503, code: str = "SlowDown", method: str | None = None, skip: int = 0
    ) -> None:
        """The next `count` requests (of `method`, if given; after `skip` of them let through) get an S3 error;
        they never reach upstream."""
        with self._lock:
            self._faults.append(_Fault("error", count, method, status, code, skip))

    def clear_faults(self) -> None:
        """Drops the faults not applied yet."""
        with self._lock:
            self._faults.clear()

    def fail_a_key_of_next_delete(self, count: int, code: str = "InternalError") -> None:
        """The next `count` DeleteObjects requests are forwarded (every key is deleted), and their answer names
        the first key as not deleted with `code`: S3's per-key failure inside a 200 answer."""
        with self._lock:
            self._faults.append(_Fault("key_error", count, "POST", 200, code))

    def drop_next(self, count: int, method: str | None = None) -> None:
        """The next `count` requests (of `method`, if given) are forwarded, but the answer is cut: half the
        body, or nothing at all when it has no body; then the connection closes."""
        with self._lock:
            self._faults.append(_Fault("drop", count, method))

    def count(
        self, method: str | None = None, path_contains: str = "", fault: str | None | bool = False
    ) -> int:
        """Requests seen, optionally of one method, with `path_contains` in the path, and with one fault kind
        (False: any; None: forwarded cleanly; "error"/"drop")."""
        with self._lock:
            seen = list(self.requests)
        return sum(
            1
            for r in seen
            if (method is None or r.method == method)
            and path_contains in r.path
            and (fault is False or r.fault == fault)
        )

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            fault = next((f for f in self._faults if f.remaining > 0 and f.method in (None, method)), None)
            if fault is not None and fault.skip > 0:
                fault.skip -= 1
                fault = None
            elif fault is not None:
                fault.remaining -= 1
            self._faults = [f for f in self._faults if f.remaining > 0]
            self.requests.append(Request(method, path, fault.kind if fault else None))
            return fault


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def handle_error(self, request, client_address) -> None:
        pass  # connections cut on purpose end in errors; they are not news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects; also answers `Expect: 100-continue`
    timeout = IDLE_TIMEOUT_S
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.proxy._lock:
            self.server.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.proxy._lock:
            self.server.proxy._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        fault = proxy._take_fault(self.command, self.path)
        if fault is not None and fault.kind == "error":
            self._send_error(fault.status, fault.code)
            return
        status, reason, headers, data = self._forward(body)
        if fault is not None and fault.kind == "key_error":
            key = re.search(rb"<Key>(.*?)</Key>", body)[1].decode()
            data = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult><Error>'
                f"<Key>{key}</Key><Code>{fault.code}</Code><Message>{fault.code}</Message>"
                "</Error></DeleteResult>"
            ).encode()
        if fault is not None and fault.kind == "drop":
            self._send_cut(status, reason, headers, data)
            return
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":  # HEAD keeps upstream's Content-Length (the object's size)
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.proxy_upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            kept = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in HOP_BY_HOP and (self.command == "HEAD" or k.lower() != "content-length")
            ]
            return response.status, response.reason, kept, data
        finally:
            conn.close()

    @property
    def proxy_upstream(self) -> tuple[str, int]:
        return self.server.proxy.upstream

    def _send_error(self, status: int, code: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{ERROR_MESSAGES.get(code, code)}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)
        self.wfile.flush()

    def _send_cut(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        if self.command != "HEAD" and len(data) >= 2:
            self.send_response_only(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))  # promise all, deliver half
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
        # else: no body to cut, so no answer at all (the request was applied upstream, the reply is lost). A
        # bare status line would not do: http.client takes "status line, EOF" for a complete, empty response.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
