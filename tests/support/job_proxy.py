"""A loopback proxy in front of a real Ray job server that answers job submissions as a head still starting does.

Right after `ray start --head`, Ray's job server answers POST /api/jobs/ with HTTP 500 "No available
agent to submit job, please try again later." until its dashboard agent registers. That window is
too short and too timing-bound to hit on purpose, so this proxy gives Ray's own reply (status and
text as `ray/dashboard/modules/job/job_head.py` writes them) to the first `refuse` submissions and
forwards every other request, token included, to the real server.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NO_AGENT_REPLY = b"No available agent to submit job, please try again later."
HOP = {"host", "connection", "transfer-encoding", "content-length", "keep-alive"}


class JobServerProxy:
    def __init__(self, target: str, refuse: int | float):
        self.target, self.refuse = target.rstrip("/"), refuse
        self.submits = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "POST" and self.path.rstrip("/") == "/api/jobs":
                    proxy.submits += 1
                    if proxy.submits <= proxy.refuse:
                        self._reply(500, {"Content-Type": "text/plain; charset=utf-8"}, NO_AGENT_REPLY)
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                request = urllib.request.Request(proxy.target + self.path, data=body, headers=headers,
                                                 method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=60) as reply:
                        self._reply(reply.status, dict(reply.headers.items()), reply.read())
                except urllib.error.HTTPError as err:
                    self._reply(err.code, dict(err.headers.items()), err.read())

            def _reply(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "JobServerProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
