"""The judge client: Chat Completions through the official `openai` SDK, to any compatible server.

- bounded concurrency (a thread pool of `judge.concurrency`);
- retries, only while no reply came back: 408/409/429, 5xx, timeouts, connection errors and bodies
  that are not a Chat Completion; exponential backoff with jitter, `Retry-After` honoured;
  other statuses (400, 401, 404) fail at once;
- a reply once received is cached (`cache.ReplyCache`) before it is used, and never requested again;
- after `judge.abort_after_failures` requests in a row end failed, the judge counts as down and the
  rest end failed unsent, so an outage ends the stage instead of retrying for hours;
- prompt and completion tokens from each reply's `usage`, priced per 1M tokens from the config.

The API key is read from the environment variable `judge.api_key_env` names, handed to the SDK
and nowhere else.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import JudgeSpec
from pipeline.eval.judge.cache import ReplyCache

log = logging.getLogger("loraforge")

TOP_LOGPROBS = 20


@dataclass
class Reply:
    content: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] | None = None
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"content": self.content, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "logprobs": self.logprobs}


@dataclass
class Failure:
    reason: str
    attempts: int


@dataclass
class Usage:
    requests: int = 0  # HTTP requests sent, retries included
    replies: int = 0  # replies received this run
    cached: int = 0  # answered from the cache, no request
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def summary(self, spec: JudgeSpec) -> dict[str, float]:
        cost = (self.prompt_tokens * spec.price_prompt_per_1m + self.completion_tokens * spec.price_completion_per_1m) / 1e6
        return {"requests": self.requests, "replies": self.replies, "cached": self.cached, "retries": self.retries,
                "failed_requests": self.failed, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": cost}


class JudgeUnavailable(Exception):
    pass


def api_key(spec: JudgeSpec) -> str:
    if spec.api_key_env is None:
        return "not-needed"  # local servers take any key; the SDK insists on one
    value = (os.environ.get(spec.api_key_env) or "").strip()  # a key read from a file keeps its newline
    if not value:
        raise JudgeUnavailable(f"judge.api_key_env: the environment variable {spec.api_key_env} is not set; "
                               f"export {spec.api_key_env}=<key> (the key never goes in the config)")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise JudgeUnavailable(f"judge.api_key_env: the value of {spec.api_key_env} holds spaces or control characters "
                               "inside it, which an HTTP header cannot carry; set it to the key alone")
    return value


def retry_after(headers: Any) -> float | None:
    """Seconds the server asked to wait: `retry-after-ms`, `retry-after` in seconds or as an HTTP date."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return float(millis) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:  # an HTTP date; a header that is neither is ignored (our own backoff applies)
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class JudgeClient:
    def __init__(self, spec: JudgeSpec, base_url: str, model: str, judge_id: str, cache: ReplyCache):
        import openai

        self.spec, self.model, self.judge_id, self.cache = spec, model, judge_id, cache
        # retries are ours (counted, capped, jittered); the SDK's own would hide them
        self.sdk = openai.OpenAI(base_url=base_url, api_key=api_key(spec), max_retries=0, timeout=spec.timeout_s)
        self.usage = Usage()
        self._failures_in_row = 0
        self._lock = threading.Lock()
        self._rng = random.Random()

    def served_models(self) -> list[str]:
        return [m.id for m in self.sdk.models.list().data]

    def decoding(self) -> dict[str, Any]:
        out: dict[str, Any] = {"temperature": self.spec.temperature, "max_tokens": self.spec.max_tokens}
        if self.spec.logprobs:
            out.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return out

    @property
    def down(self) -> bool:
        return self._failures_in_row >= self.spec.abort_after_failures

    def chat(self, messages: list[dict[str, str]]) -> Reply | Failure:
        """One judge reply for `messages`: from the cache, or requested (with retries) and cached."""
        decoding = self.decoding()
        key = self.cache.key(self.judge_id, messages, decoding)
        hit = self.cache.get(key)
        if hit is not None:
            self.usage.add(cached=1)
            return Reply(**hit, cached=True)
        reason = ""
        for attempt in range(self.spec.max_retries + 1):
            if self.down:
                self.usage.add(failed=1)
                return Failure(f"not sent: the judge failed {self._failures_in_row} requests in a row "
                               f"(last: {reason or 'see earlier items'})", attempt)
            if attempt:
                self.usage.add(retries=1)
            self.usage.add(requests=1)
            outcome = self._request(messages, decoding, attempt)
            if isinstance(outcome, Reply):
                self.cache.put(key, self.judge_id, outcome.to_json())
                self.usage.add(replies=1, prompt_tokens=outcome.prompt_tokens,
                               completion_tokens=outcome.completion_tokens)
                with self._lock:
                    self._failures_in_row = 0
                return outcome
            reason, wait, retryable = outcome
            if not retryable or attempt == self.spec.max_retries:
                break
            time.sleep(wait)
        with self._lock:
            self._failures_in_row += 1
        self.usage.add(failed=1)
        return Failure(reason, attempt + 1)

    def _backoff(self, attempt_wait: float | None, attempt: int) -> float:
        if attempt_wait is not None:  # the server said how long; a little jitter spreads the herd
            return min(attempt_wait, self.spec.backoff_max_s) * (1 + 0.1 * self._rng.random())
        return min(self.spec.backoff_s * 2 ** attempt, self.spec.backoff_max_s) * (0.5 + 0.5 * self._rng.random())

    def _request(self, messages: list[dict[str, str]], decoding: dict[str, Any], attempt: int
                 ) -> Reply | tuple[str, float, bool]:
        """A reply, or (why not, how long to wait, whether to retry)."""
        import openai

        try:
            response = self.sdk.chat.completions.create(model=self.model, messages=messages, n=1, **decoding)
            choice = response.choices[0]
        except openai.APIStatusError as err:
            status = err.status_code
            retryable = status in (408, 409, 429) or status >= 500
            wait = self._backoff(retry_after(err.response.headers), attempt)
            return f"HTTP {status}: {_short(err.message)}", wait, retryable
        except openai.APITimeoutError:
            return f"timeout after {self.spec.timeout_s:g} s", self._backoff(None, attempt), True
        except openai.APIConnectionError as err:
            return f"connection error: {_short(str(err.__cause__ or err))}", self._backoff(None, attempt), True
        except Exception as err:  # a 200 whose body is not a Chat Completion (malformed JSON, no choices)
            return f"malformed reply: {err.__class__.__name__}: {_short(str(err))}", self._backoff(None, attempt), True
        message = choice.message
        content = message.content if message.content is not None else (getattr(message, "refusal", None) or "")
        logprobs = None
        if choice.logprobs is not None and choice.logprobs.content:
            logprobs = [{"token": t.token, "logprob": t.logprob,
                         "top_logprobs": [{"token": a.token, "logprob": a.logprob} for a in (t.top_logprobs or [])]}
                        for t in choice.logprobs.content]
        usage = response.usage
        return Reply(content, choice.finish_reason, usage.prompt_tokens if usage else 0,
                     usage.completion_tokens if usage else 0, logprobs)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
