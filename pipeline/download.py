"""HTTP(S) downloads that resume: a `.part` file grows until the server's length is reached.

A transfer cut in the middle (a dropped connection, a short body) is retried with a
`Range` request from the bytes already on disk, within one call and across calls: a
`.part` left by an earlier run is resumed, not restarted. Checking what arrived is the
caller's job (`pipeline.datafiles` checks sha256 and git blob hashes).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK = 1 << 16
TIMEOUT_S = (10, 60)  # connect, read
CUT = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)


class NotThere(Exception):
    """The server answered that it has no such file (404/410), or could not be reached at all."""


class DownloadError(Exception):
    """The transfer failed for another reason: an unexpected status, or too many cuts."""


def _total_from(response: requests.Response, offset: int) -> int | None:
    """Full size of the file from Content-Range (206) or Content-Length (200)."""
    if response.status_code == 206:
        match = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
        return int(match.group(1)) if match else None
    length = response.headers.get("Content-Length")
    return int(length) + offset if length is not None else None


def download(url: str, dest: Path, *, label: str, attempts: int = 5, backoff_s: float = 0.5,
             session: requests.Session | None = None) -> Path:
    """Fetch `url` into `dest`, resuming from `dest.part`; returns `dest` once the whole body arrived."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    http = session or requests.Session()
    last_error = "no attempt made"
    for attempt in range(1, attempts + 1):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with http.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
                if response.status_code in (404, 410):
                    raise NotThere(f"HTTP {response.status_code}")
                if response.status_code == 416 and offset:
                    # Nothing past what we hold: the part is complete, or stale; restart once to find out.
                    part.unlink()
                    last_error = "HTTP 416 for the bytes already held"
                    continue
                if response.status_code not in (200, 206):
                    raise DownloadError(f"HTTP {response.status_code} {response.reason}")
                if response.status_code == 200 and offset:
                    log.info("%s: the server ignored the range request; starting over", label)
                    offset = 0
                total = _total_from(response, offset)
                mode = "ab" if response.status_code == 206 else "wb"
                with part.open(mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                                  desc=label, leave=False, disable=None) as bar:
                    for chunk in response.iter_content(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
        except NotThere:
            raise
        except requests.exceptions.ConnectionError as err:
            if not part.exists() and attempt == 1 and (reason := _unreachable(err)):
                raise NotThere(f"cannot connect ({reason})") from None
            last_error = f"{type(err).__name__}: {err}"
        except CUT as err:
            last_error = f"{type(err).__name__}: {err}"
        else:
            held = part.stat().st_size
            if total is None or held == total:
                part.replace(dest)
                return dest
            last_error = f"the body ended at {held} of {total} bytes"
        held = part.stat().st_size if part.exists() else 0
        log.warning("%s: transfer cut at %d bytes (%s); resuming (attempt %d of %d)",
                    label, held, last_error, attempt + 1, attempts)
        time.sleep(backoff_s * attempt)
    raise DownloadError(f"gave up after {attempts} attempts: {last_error}")


def _unreachable(err: requests.exceptions.ConnectionError) -> str | None:
    """Why a connection never opened (DNS, refused, no route), or None for a cut transfer worth retrying."""
    reason = getattr(err.args[0], "reason", None) if err.args else None
    if isinstance(reason, urllib3.exceptions.NewConnectionError):  # NameResolutionError is one too
        return type(reason).__name__
    return None
