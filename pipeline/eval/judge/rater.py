"""The offline default judge: ratings read from a local model's own distribution, served on loopback.

A small instruct model given FastChat's judge prompts does not write `[[rating]]`: it continues
the pasted answers (SmolLM2-135M: 48 of 48 items unparseable when it generated freely). So the
default judge does not generate. It decodes constrained to the judge's format: the chat template,
then the format's opening (`Rating: [[`, `[[` for a verdict, `A: [[` for each side-by-side line),
then each allowed value (`1`..`10`, `A`/`B`/`C`, `1`..`9`) closed by `]]`, scored by its
log-likelihood under the model (teacher forcing over the prompt's cached keys and values). The
reply names the most likely value in the judge's format, and carries every allowed value's
log-probability (renormalised over the allowed ones) as the rating token's `top_logprobs`, so the
stage reads a probability-weighted rating from it as from any judge that returns logprobs
(G-Eval). Every item gets a rating.

It speaks the OpenAI Chat Completions protocol on 127.0.0.1 (`GET /v1/models`, `POST
/v1/chat/completions`), from a thread of the process that starts it, so the stage goes through
the same client, cache, item states and FastChat files as with a remote judge.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("loraforge")

# part of the judge's identity (and so of its cache key): replies made another way are another judge's
METHOD = "constrained-v1"
SIDE_BY_SIDE_LINE = re.compile(r"(?m)^([A-Z]): \[\[rating\]\]$")
SCALE = re.compile(r"scale of (\d+) to (\d+)")


@dataclass(frozen=True)
class Format:
    """What the judge prompt asks for: one bracketed value after `opening`, per label for side-by-side."""

    kind: str  # single | pairwise | side_by_side
    values: tuple[str, ...]
    labels: tuple[str, ...] = ()


def judge_format(messages: list[dict[str, str]]) -> Format:
    """The format FastChat's prompts (and ours, for side by side) ask for, read from the messages."""
    text = "\n".join(m["content"] for m in messages if m["role"] in ("system", "user"))
    labels = tuple(dict.fromkeys(SIDE_BY_SIDE_LINE.findall(text)))
    if labels:
        return Format("side_by_side", tuple(str(k) for k in range(1, 10)), labels)
    if "[[A]]" in text and "[[B]]" in text:
        return Format("pairwise", ("A", "B", "C"))
    scale = SCALE.findall(text)
    low, high = (int(scale[-1][0]), int(scale[-1][1])) if scale else (1, 10)
    return Format("single", tuple(str(k) for k in range(low, high + 1)))


class Rater:
    """A causal LM that answers judge prompts with the most likely allowed value and all their probabilities."""

    def __init__(self, folder: Path, threads: int = 2):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.lock = threading.Lock()  # one forward at a time: the requests queue, the cache is per request

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _choose(self, prompt_ids: list[int], values: tuple[str, ...]) -> dict[str, float]:
        """log P(value + "]]" | prompt) for each value, renormalised over the values."""
        import torch
        from transformers import DynamicCache

        with torch.no_grad():
            cache = DynamicCache()
            out = self.model(input_ids=torch.tensor([prompt_ids]), cache=cache, use_cache=True)
            first = out.logits[0, -1].log_softmax(-1)
            scores = {}
            for value in values:
                ids = self._ids(value + "]]")
                total = float(first[ids[0]])
                if len(ids) > 1:
                    step = self.model(input_ids=torch.tensor([ids[:-1]]), cache=cache, use_cache=True)
                    logprobs = step.logits[0].log_softmax(-1)
                    total += sum(float(logprobs[i, token]) for i, token in enumerate(ids[1:]))
                    cache.crop(-(len(ids) - 1))  # back to the prompt's keys and values
                scores[value] = total
        norm = math.log(sum(math.exp(s) for s in scores.values()))
        return {value: s - norm for value, s in scores.items()}

    def answer(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """The reply text, its logprobs (OpenAI's `choices[0].logprobs.content`) and token counts."""
        fmt = judge_format(messages)
        if self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model: the turns as plain text
            prompt = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "
        with self.lock:
            if fmt.kind == "side_by_side":
                text, content = "", []
                for i, label in enumerate(fmt.labels):
                    opening = f"{label}: [[" if i == 0 else f"]]\n{label}: [["
                    text += opening
                    dist = self._choose(self._ids(prompt + text), fmt.values)
                    best = max(dist, key=dist.get)
                    text += best
                    content += [{"token": opening, "logprob": 0.0, "top_logprobs": []}, _rating_token(best, dist)]
                text += "]]"
                content.append({"token": "]]", "logprob": 0.0, "top_logprobs": []})
            else:
                opening = "Rating: [[" if fmt.kind == "single" else "[["
                dist = self._choose(self._ids(prompt + opening), fmt.values)
                best = max(dist, key=dist.get)
                text = f"{opening}{best}]]"
                content = [{"token": opening, "logprob": 0.0, "top_logprobs": []}, _rating_token(best, dist),
                           {"token": "]]", "logprob": 0.0, "top_logprobs": []}]
        return {"content": text, "logprobs": content, "prompt_tokens": len(self._ids(prompt)),
                "completion_tokens": len(self._ids(text))}


def _rating_token(best: str, dist: dict[str, float]) -> dict[str, Any]:
    return {"token": best, "logprob": dist[best],
            "top_logprobs": [{"token": v, "logprob": lp} for v, lp in sorted(dist.items(), key=lambda kv: -kv[1])]}


def _handler(rater: Rater, model_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # the stage's progress bar says enough
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "local"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                messages = [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
            except (ValueError, KeyError, TypeError) as err:
                self._send(400, {"error": {"message": f"bad request: {err}", "type": "invalid_request_error"}})
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            try:
                reply = rater.answer(messages)
            except Exception as err:  # a prompt the model cannot take (too long): the client retries, then fails it
                self._send(500, {"error": {"message": f"{err.__class__.__name__}: {err}", "type": "server_error"}})
                return
            self._send(200, {
                "id": f"chatcmpl-local-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply["content"]},
                             "logprobs": {"content": [{**t, "bytes": None, "top_logprobs": [
                                 {**a, "bytes": None} for a in t["top_logprobs"]]} for t in reply["logprobs"]],
                                 "refusal": None}}],
                "usage": {"prompt_tokens": reply["prompt_tokens"], "completion_tokens": reply["completion_tokens"],
                          "total_tokens": reply["prompt_tokens"] + reply["completion_tokens"]},
            })

    return Handler


@contextmanager
def serve(folder: Path, model_name: str, port: int = 0, threads: int = 2) -> Iterator[str]:
    """The rater for the model in `folder` on 127.0.0.1 (`port`, 0: a free one); yields its base URL."""
    began = time.monotonic()
    rater = Rater(folder, threads)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(rater, model_name))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="loraforge-judge", daemon=True)
    thread.start()
    log.info("local judge %s up on 127.0.0.1:%d in %.1f s", model_name[:40], server.server_address[1],
             time.monotonic() - began)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
