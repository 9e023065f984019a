"""Judge replies cached on disk, keyed by (judge id, full messages, decoding settings).

A re-run sends no request for what was already judged, and an interrupted run resumes: each
reply is written the moment it arrives. One SQLite file, safe for the client's threads and for
two runs at once. Failures are not cached, so a re-run asks again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any


def default_dir() -> Path:
    return Path(os.environ.get("LORAFORGE_JUDGE_CACHE") or Path.home() / ".cache" / "loraforge" / "judge")


class ReplyCache:
    def __init__(self, directory: Path | None):
        self.directory = directory or default_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "replies.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                             "reply TEXT NOT NULL, created REAL NOT NULL)")

    @staticmethod
    def key(judge_id: str, messages: list[dict[str, str]], decoding: dict[str, Any]) -> str:
        blob = json.dumps({"judge": judge_id, "messages": messages, "decoding": decoding}, sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, judge_id: str, reply: dict[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                             (key, judge_id, json.dumps(reply, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
