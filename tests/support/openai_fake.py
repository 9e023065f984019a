"""A loopback server speaking the OpenAI Chat Completions protocol, for what cannot run here (a paid judge API).

It answers `GET /v1/models` and `POST /v1/chat/completions` over real HTTP, like the API does:
JSON bodies, `usage`, `logprobs` when asked, 401 without the right bearer key, 429 with
`Retry-After`, 5xx. Tests script its faults:

- `faults`: request number (1-based, in arrival order) -> "400", "429", "500", "503", "hang", "malformed";
- `always_fail`: a marker; any request whose messages contain it gets a 500, every time;
- `no_rating`: a marker; replies to messages containing it have no rating (re-asks too);
- `latency_s`: added to every request (the B11 benchmark);
- `scripted`: the first user message -> the reply text (a test's own rule; re-asks get the same reply).

Replies are deterministic in the messages: a rating or verdict derived from their hash, in the
format the prompt asks for (FastChat's `[[n]]`, `[[A]]`/`[[B]]`/`[[C]]`, or `X: [[n]]` lines).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


@dataclass
class FakeJudge:
    model: str = "gpt-4o-fake"
    api_key: str | None = None
    faults: dict[int, str] = field(default_factory=dict)
    always_fail: str | None = None
    no_rating: str | None = None
    latency_s: float = 0.0
    scripted: dict[str, str] = field(default_factory=dict)
    hang_s: float = 5.0
    retry_after: str = "1"
    requests: list[dict] = field(default_factory=list)  # every chat request body, in arrival order
    headers: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival time of each request
    statuses: list[int] = field(default_factory=list)  # the status each request got (in arrival order)
    posts: int = 0  # every POST, those refused for their key (401) included
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reply_text(self, messages: list[dict]) -> str:
        first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
        if first_user in self.scripted:
            return self.scripted[first_user]
        text = "\n".join(m["content"] for m in messages)
        digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
        if self.no_rating and self.no_rating in text:
            return "I cannot decide on a number for this one."
        last = messages[-1]["content"] + messages[0]["content"]
        if "[[A]]" in last:  # pairwise (or its re-ask)
            return f"Assistant {'AB'[digest % 2]} follows the instructions more closely. [[{'ABC'[digest % 3]}]]"
        labels = re.findall(r"(?m)^([A-Z]): \[\[rating\]\]$", last)
        if labels:
            return "Comparing the answers.\n" + "\n".join(f"{x}: [[{1 + (digest >> i) % 9}]]" for i, x in enumerate(labels))
        return f"The response is relevant but brief. Rating: [[{1 + digest % 10}]]"


def _logprobs(text: str) -> dict:
    """Tokens: the text split at the rating digits, which get top alternatives around them."""
    match = re.search(r"\[\[(\d+)\]\]", text)
    pieces = [text] if not match else [text[:match.start(1)], match.group(1), text[match.end(1):]]
    content = []
    for piece in pieces:
        if not piece:
            continue
        entry = {"token": piece, "logprob": -0.01, "bytes": None, "top_logprobs": []}
        if piece.isdigit():
            n = int(piece)
            entry["top_logprobs"] = [{"token": str(n), "logprob": -0.4, "bytes": None}] + [
                {"token": str(k), "logprob": -1.5, "bytes": None} for k in (n - 1, n + 1) if 1 <= k <= 10]
            entry["logprob"] = -0.4
        content.append(entry)
    return {"content": content, "refusal": None}


def _handler(judge: FakeJudge) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            if getattr(self, "_number", None):
                judge.statuses[self._number - 1] = status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps({"error": {"message": message, "type": "fake", "code": status}}).encode(),
                       headers)

        def _authorized(self) -> bool:
            if judge.api_key is None or self.headers.get("Authorization") == f"Bearer {judge.api_key}":
                return True
            self._error(401, "Incorrect API key provided")
            return False

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, json.dumps({"object": "list", "data": [
                    {"id": judge.model, "object": "model", "created": 0, "owned_by": "fake"}]}).encode())
            else:
                self._error(404, "not found")

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with judge.lock:
                judge.posts += 1
            if not self._authorized():
                return
            with judge.lock:
                judge.requests.append(body)
                judge.headers.append(dict(self.headers))
                judge.times.append(time.perf_counter())
                judge.statuses.append(0)
                number = len(judge.requests)
            self._number = number
            if judge.latency_s:
                time.sleep(judge.latency_s)
            fault = judge.faults.get(number)
            text_in = "\n".join(m["content"] for m in body.get("messages", []))
            if body.get("model") != judge.model:
                return self._error(404, f"The model `{body.get('model')}` does not exist")
            if fault == "400":
                return self._error(400, "Invalid value for 'messages'")
            if fault == "429":
                return self._error(429, "Rate limit reached", {"Retry-After": judge.retry_after})
            if fault in ("500", "503") or (judge.always_fail and judge.always_fail in text_in):
                return self._error(int(fault or 500), "The server had an error while processing your request")
            if fault == "hang":
                time.sleep(judge.hang_s)
            if fault == "malformed":
                return self._send(200, b'{"id": "x", "choices": [{"message": {"content": "Rating: [[')
            text = judge.reply_text(body["messages"])
            choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text},
                      "logprobs": _logprobs(text) if body.get("logprobs") else None}
            usage = {"prompt_tokens": len(text_in) // 4, "completion_tokens": len(text) // 4,
                     "total_tokens": len(text_in) // 4 + len(text) // 4}
            self._send(200, json.dumps({"id": f"chatcmpl-{number}", "object": "chat.completion",
                                        "created": int(time.time()), "model": judge.model, "choices": [choice],
                                        "usage": usage}).encode())

    return Handler


@contextmanager
def serve(judge: FakeJudge) -> Iterator[str]:
    """Run `judge` on 127.0.0.1 (a free port); yields the base URL (`http://127.0.0.1:P/v1`)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(judge))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
