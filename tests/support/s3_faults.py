"""A loopback HTTP proxy in front of moto's S3 server that injects storage faults (F3, F12, F18).

Clients (pyarrow's S3 filesystem for Ray's storage, boto3 for MLflow's artifacts) talk to the proxy
as if it were the store; every request goes on to the real moto server unless `decide(method, path)`
says otherwise:
- "drop": the connection is closed with no reply, as an outage or a dead link does;
- (status, body): that reply instead, e.g. S3's own 403 AccessDenied XML for a denied PutObject.
moto keeps its objects in memory, so stopping it would lose the bucket: an outage is the proxy
dropping every request for a while (what a toxiproxy 100% drop does).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlparse

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
ACCESS_DENIED = (403, b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                      b"<Message>Access Denied</Message></Error>")



class S3FaultProxy:
    def __init__(self, target: str, decide: Callable[[str, str], "str | tuple[int, bytes] | None"] | None = None):
        upstream = urlparse(target)
        self.host, self.port = upstream.hostname, upstream.port
        self.decide = decide or (lambda method, path: None)
        self.log: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    what = proxy.decide(self.command, self.path)
                    proxy.log.append((self.command, self.path, "forwarded" if what is None else
                                      what if isinstance(what, str) else str(what[0])))
                if what == "drop":
                    self.close_connection = True
                    return
                if what is not None:
                    status, payload = what
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    reply = upstream.getresponse()
                    payload = reply.read()
                    self.send_response(reply.status)
                    for key, value in reply.getheaders():
                        if key.lower() not in HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    # a HEAD reply carries the object's length and no body
                    length = reply.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def seen(self, what: str) -> list[tuple[str, str, str]]:
        with self.lock:
            return [entry for entry in self.log if entry[2] == what]

    def __enter__(self) -> "S3FaultProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
