"""Data preparation: download + verify + cache, deterministic token files, clear failures.

Nothing here touches the network: Tiny Shakespeare is served from a local HTTP server on
127.0.0.1 (or a file:// URL), and "unreachable" means a closed local port.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import (
    DataError,
    datasets,
    download,
    ensure_prepared,
    load_meta,
    load_tokenizer,
    load_tokens,
    prepare,
)
from gptforge.gpt.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
GPT2_CACHE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
FILES = ("train.bin", "val.bin", "meta.json")


class _Server:
    """A local HTTP server in a thread; ``routes`` maps a path to the bytes served there."""

    def __init__(self, routes: dict[str, bytes]):
        self.routes = routes
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    # urllib honours http_proxy; the local server must be reached directly, never through a proxy
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def server():
    path = Path(os.environ.get("GPT_SHARED_DATA", REPO.parent / "shared" / "data")) / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {path} (set GPT_SHARED_DATA)")
    good = path.read_bytes()
    corrupt = good[:1000] + b"X" + good[1001:]  # same length, one byte changed
    srv = _Server({"/input.txt": good, "/corrupt.txt": corrupt})
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def serve_shakespeare(server, monkeypatch):
    """GPT_DATA_URL pointing at the local server's good copy."""
    monkeypatch.setenv("GPT_DATA_URL", server.url("/input.txt"))
    return server


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as s:  # bind, read the port, close: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


def _need_gpt2_cache():
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache or not all((Path(cache) / name).is_file() for name in GPT2_CACHE_FILES):
        pytest.skip("no tiktoken cache with the gpt2 files (set TIKTOKEN_CACHE_DIR); tests never use the network")


def _files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- Tiny Shakespeare


def test_shakespeare_char_is_deterministic_and_counts_match(serve_shakespeare, shakespeare_path, tmp_path):
    first = prepare("shakespeare_char", tmp_path / "a")
    second = prepare("shakespeare_char", tmp_path / "b")
    assert first == tmp_path / "a" / "shakespeare_char"
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # prepared again in place: still the same bytes
    prepare("shakespeare_char", tmp_path / "a")
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    meta = load_meta(first)
    text = shakespeare_path.read_text(encoding="utf-8")
    assert meta["vocab_size"] == 65
    assert meta["train_tokens"] == 1_003_854 == int(len(text) * 0.9)
    assert meta["val_tokens"] == 111_540 == len(text) - meta["train_tokens"]
    assert meta["source"]["sha256"] == download.SHAKESPEARE_SHA256
    assert meta["source"]["bytes"] == 1_115_394
    assert meta["tokenizer"]["name"] == "char"
    for split in datasets.SPLITS:
        assert (first / f"{split}.bin").stat().st_size == 2 * meta[f"{split}_tokens"]

    train, val = load_tokens(first, "train"), load_tokens(first, "val")
    assert train.dtype == np.uint16
    assert len(train) == 1_003_854
    assert len(val) == 111_540
    tok = load_tokenizer(first)
    assert tok.decode(train) + tok.decode(val) == text
    assert _files_in(tmp_path / "a" / "downloads") == ["tinyshakespeare.txt"]


def test_download_is_cached_and_reverified(serve_shakespeare, closed_port_url, monkeypatch, tmp_path):
    serve_shakespeare.requests.clear()
    prepare("shakespeare_char", tmp_path)
    assert serve_shakespeare.requests == ["/input.txt"]

    # a second run uses the cache: the URL is never asked
    monkeypatch.setenv("GPT_DATA_URL", closed_port_url)
    prepare("shakespeare_char", tmp_path)

    # a cached copy that no longer matches its hash is not used ...
    cached = tmp_path / "downloads" / "tinyshakespeare.txt"
    cached.write_bytes(cached.read_bytes().replace(b"Citizen", b"Citizan", 1))
    with pytest.raises(DataError, match="could not download"):
        prepare("shakespeare_char", tmp_path)
    assert not cached.exists()
    # ... and is fetched again when the URL works
    monkeypatch.setenv("GPT_DATA_URL", serve_shakespeare.url("/input.txt"))
    prepare("shakespeare_char", tmp_path)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == download.SHAKESPEARE_SHA256


def test_corrupted_download_is_refused_and_not_kept(server, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_DATA_URL", server.url("/corrupt.txt"))
    with pytest.raises(DataError) as err:
        prepare("shakespeare_char", tmp_path)
    message = str(err.value)
    corrupt_sha = hashlib.sha256(server.routes["/corrupt.txt"]).hexdigest()
    assert "sha256" in message
    assert download.SHAKESPEARE_SHA256 in message
    assert corrupt_sha in message
    assert "/corrupt.txt" in message
    assert "GPT_DATA_URL" in message
    assert _files_in(tmp_path / "downloads") == []  # neither the file nor a temp file
    assert not (tmp_path / "shakespeare_char" / "meta.json").exists()


def test_unreachable_url_fails_clearly(closed_port_url, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_DATA_URL", closed_port_url)
    started = time.monotonic()
    with pytest.raises(DataError, match="could not download") as err:
        prepare("shakespeare_char", tmp_path)
    assert time.monotonic() - started < 10
    assert closed_port_url in str(err.value)
    assert "GPT_DATA_URL" in str(err.value)
    assert _files_in(tmp_path / "downloads") == []


def test_http_error_fails_clearly(server, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_DATA_URL", server.url("/missing.txt"))
    with pytest.raises(DataError, match="404"):
        prepare("shakespeare_char", tmp_path)
    assert _files_in(tmp_path / "downloads") == []


def test_silent_server_times_out(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/input.txt"
        started = time.monotonic()
        with pytest.raises(DataError, match="timed out"):
            download.download(url, tmp_path / "x.txt", download.SHAKESPEARE_SHA256, timeout=0.5)
        assert time.monotonic() - started < 5
    assert _files_in(tmp_path) == []


def test_file_url_and_plain_path_work(shakespeare_path, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_DATA_URL", shakespeare_path.as_uri())
    folder = prepare("shakespeare_char", tmp_path / "a")
    assert load_meta(folder)["train_tokens"] == 1_003_854
    monkeypatch.setenv("GPT_DATA_URL", str(shakespeare_path))
    assert load_meta(prepare("shakespeare_char", tmp_path / "b"))["val_tokens"] == 111_540


def test_shakespeare_gpt2_counts(shakespeare_path, monkeypatch, tmp_path):
    _need_gpt2_cache()
    monkeypatch.setenv("GPT_DATA_URL", shakespeare_path.as_uri())
    folder = prepare("shakespeare", tmp_path)  # gpt2 is this dataset's default tokenizer
    meta = load_meta(folder)
    assert meta["tokenizer"]["name"] == "gpt2"
    assert meta["vocab_size"] == 50257
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)  # nanoGPT's numbers
    assert len(load_tokens(folder, "train")) + len(load_tokens(folder, "val")) == 338_025
    tok = load_tokenizer(folder)
    text = shakespeare_path.read_text(encoding="utf-8")
    assert tok.decode(load_tokens(folder, "train")) + tok.decode(load_tokens(folder, "val")) == text


# ----------------------------------------------------------------------------- --input


def test_custom_input(tmp_path):
    text = "It is a truth universally acknowledged, that a single man\nin possession of a good fortune...\n" * 3
    path = tmp_path / "austen.txt"
    path.write_text(text, encoding="utf-8")
    folder = prepare("austen", tmp_path / "data", input_path=path)
    meta = load_meta(folder)
    assert meta["tokenizer"]["name"] == "char"  # char unless the dataset is "shakespeare"
    assert meta["source"] == {
        "name": "austen",
        "path": str(path.resolve()),
        "bytes": len(text.encode()),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    assert meta["train_tokens"] == len(text) * 9 // 10
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    tok = load_tokenizer(folder)
    assert tok.decode(load_tokens(folder, "train")) + tok.decode(load_tokens(folder, "val")) == text
    assert not (tmp_path / "data" / "downloads").exists()  # nothing downloaded


def test_custom_input_with_gpt2(tmp_path):
    _need_gpt2_cache()
    path = tmp_path / "poem.txt"
    text = "Shall I compare thee to a summer\u2019s day?\nThou art more lovely and more temperate.\n" * 4
    path.write_text(text, encoding="utf-8")
    folder = prepare("poem", tmp_path, input_path=path, tokenizer="gpt2")
    tok = load_tokenizer(folder)
    assert tok.name == "gpt2"
    assert tok.decode(load_tokens(folder, "train")) + tok.decode(load_tokens(folder, "val")) == text


def test_vocab_beyond_uint16_is_refused(tmp_path):
    path = tmp_path / "wide.txt"
    path.write_text("".join(chr(0x10000 + i) for i in range(65537)), encoding="utf-8")  # 65,537 distinct chars
    with pytest.raises(DataError, match="uint16"):
        prepare("wide", tmp_path, input_path=path)
    assert not (tmp_path / "wide" / "train.bin").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "empty"), (b"caf\xe9\n", "not UTF-8"), (b"x", "too short")],
    ids=["empty", "latin-1", "one-char"],
)
def test_bad_input_files_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        prepare("bad", tmp_path, input_path=path)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(DataError, match="input file not found"):
        prepare("x", tmp_path, input_path=tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"unknown dataset 'openwebtext'.*--input"):
        prepare("openwebtext", tmp_path)
    with pytest.raises(DataError, match="unknown tokenizer 'bpe'"):
        prepare("shakespeare_char", tmp_path, tokenizer="bpe")
    for name in ("../evil", "a/b", "", ".hidden", "downloads"):
        with pytest.raises(DataError, match="bad dataset name"):
            prepare(name, tmp_path, input_path=tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- atomic writes, loading


def test_interrupted_prepare_leaves_no_half_files(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 100)
    folder = prepare("t", tmp_path, input_path=path)
    calls = []

    def fsync_then_die(fd):
        calls.append(fd)
        if len(calls) == 2:  # while writing val.bin
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare("t", tmp_path, input_path=path)
    assert _files_in(folder) == ["train.bin", "val.bin"]  # old val.bin kept whole, no temp file, no meta.json
    monkeypatch.undo()
    # meta.json missing means "not prepared": ensure_prepared prepares it again
    assert ensure_prepared("t", tmp_path, input_path=path) == folder
    assert _files_in(folder) == sorted(FILES)


def test_ensure_prepared(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("hello there, general kenobi\n" * 10)
    folder = ensure_prepared("t", tmp_path, input_path=path)
    assert _files_in(folder) == sorted(FILES)

    def must_not_prepare(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(datasets, "prepare", must_not_prepare)
    assert ensure_prepared("t", tmp_path, input_path=path) == folder
    assert ensure_prepared("t", tmp_path) == folder
    with pytest.raises(DataError, match="prepared with the char tokenizer, not gpt2"):
        ensure_prepared("t", tmp_path, input_path=path, tokenizer="gpt2")
    path.write_text("something else entirely\n" * 10)
    with pytest.raises(DataError, match="changed since"):
        ensure_prepared("t", tmp_path, input_path=path)


def test_load_meta_errors(tmp_path):
    with pytest.raises(DataError, match=r"no meta\.json.*prepare"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format_version": 1, "vocab_')
    with pytest.raises(DataError, match="corrupt"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format_version": 1}')
    with pytest.raises(DataError, match="lacks vocab_size"):
        load_meta(tmp_path)


def test_load_tokens_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 100)
    folder = prepare("t", tmp_path, input_path=path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_tokens(folder, "test")
    (folder / "val.bin").write_bytes((folder / "val.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"meta\.json says 100 tokens"):
        load_tokens(folder, "val")
    (folder / "val.bin").unlink()
    with pytest.raises(DataError, match=r"val\.bin is missing"):
        load_tokens(folder, "val")
    meta = json.loads((folder / "meta.json").read_text())
    meta["format_version"] = 99
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format version 99"):
        load_tokens(folder, "train")


def test_char_vocabulary_covers_both_splits(tmp_path):
    # a character only in the validation part still gets a token
    path = tmp_path / "t.txt"
    path.write_text("a" * 90 + "z" * 10)
    tok = load_tokenizer(prepare("t", tmp_path, input_path=path))
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == "az"


# ----------------------------------------------------------------------------- command line


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptforge.data", *args],
        check=False,
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_prepares_input_and_dataset(tmp_path, shakespeare_path):
    path = tmp_path / "sonnets.txt"
    path.write_text("From fairest creatures we desire increase,\n" * 20)
    result = _cli("prepare", "--input", str(path), "--data_dir", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    assert _files_in(tmp_path / "data" / "sonnets") == sorted(FILES)  # dataset name = the file's stem

    result = _cli(
        "prepare",
        "--dataset=shakespeare_char",
        f"--data_dir={tmp_path / 'data'}",
        GPT_DATA_URL=shakespeare_path.as_uri(),
    )
    assert result.returncode == 0, result.stderr
    assert "1,003,854" in result.stderr
    assert load_meta(tmp_path / "data" / "shakespeare_char")["val_tokens"] == 111_540


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["prepare", "--input", "/no/such/file.txt"], "input file not found"),
        (["prepare", "--dataset", "openwebtext"], "unknown dataset"),
        (["prepare", "--dataset", "shakespeare_char", "--tokenizer", "bpe"], "must be char or gpt2 here, got 'bpe'"),
        (["prepare"], "give --dataset"),
        (["prepare", "--dataset", "shakespeare_char"], "could not download"),
    ],
    ids=["missing-input", "unknown-dataset", "bad-tokenizer", "no-dataset", "unreachable"],
)
def test_cli_errors_are_one_line(tmp_path, closed_port_url, args, match):
    result = _cli(*args, "--data_dir", str(tmp_path), GPT_DATA_URL=closed_port_url)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, result.stderr
    assert match in error_lines[0], result.stderr
