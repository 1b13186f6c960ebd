"""Tiny Shakespeare, fetched once into ``<data_dir>/downloads/`` and kept while its sha256 matches.

The download is checked against a fixed sha256 before it is kept: a mirror that serves other
bytes, or a download cut short, is refused. ``GPT_DATA_URL`` points it at a mirror or a local
copy (an http(s) URL, file:///path or a plain path), for machines without internet access.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from gptforge.data.atomic import temp_name
from gptforge.data.errors import DataError

log = logging.getLogger(__name__)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CACHE_NAME = "tinyshakespeare.txt"
SHAKESPEARE_NAME = "tinyshakespeare"  # the source name in meta.json
DATA_URL_ENV = "GPT_DATA_URL"  # replaces SHAKESPEARE_URL: an http(s) mirror or a file:// path
DOWNLOAD_TIMEOUT_S = 30.0
DOWNLOADS_DIR = "downloads"  # under data_dir, beside the dataset folders


def fetch_shakespeare(data_dir: str | Path = "data", timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """Tiny Shakespeare's bytes: from ``<data_dir>/downloads/`` if the cached copy's sha256 matches, else downloaded."""
    cached = Path(data_dir) / DOWNLOADS_DIR / SHAKESPEARE_CACHE_NAME
    if cached.is_file():
        raw = cached.read_bytes()
        if hashlib.sha256(raw).hexdigest() == SHAKESPEARE_SHA256:
            return raw
        log.warning("%s does not match its sha256 (damaged?); downloading it again", cached)
        cached.unlink()
    url = os.environ.get(DATA_URL_ENV) or SHAKESPEARE_URL
    download(url, cached, SHAKESPEARE_SHA256, timeout=timeout)
    return cached.read_bytes()


def download(url: str, dest: str | Path, sha256: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` (http, https, file:// or a plain path) to ``dest``, keeping it only if its sha256 matches."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if "://" not in url:  # a plain local path is accepted too
        url = Path(url).resolve().as_uri()
    hint = f"Set {DATA_URL_ENV} to a mirror (https://... or file:///path/to/input.txt), or pass --input path.txt"
    log.info("downloading %s", url)
    tmp = temp_name(dest)
    hasher = hashlib.sha256()
    try:
        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "xb") as out:
            while chunk := response.read(1 << 16):
                hasher.update(chunk)
                out.write(chunk)
                # the socket timeout bounds each read; this bounds a server that trickles bytes forever
                if time.monotonic() - started > 10 * timeout:
                    raise TimeoutError(f"download took longer than {10 * timeout:.0f} s")
        got = hasher.hexdigest()
        if got != sha256:
            raise DataError(
                f"the file downloaded from {url} has the wrong sha256: expected {sha256}, got {got}; "
                f"refusing it (nothing was kept). {hint}"
            )
        os.replace(tmp, dest)
    except (OSError, ValueError) as err:  # URLError, HTTPError and socket timeouts are OSErrors; ValueError: bad URL
        # HTTPError's str carries the status code; other URLErrors wrap the socket error in .reason
        reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
        raise DataError(f"could not download {url}: {reason}. {hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
