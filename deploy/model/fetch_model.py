#!/usr/bin/env python3
"""Download a CLIP ONNX export from a Hugging Face-style hub into an oodgate model folder.

    fetch_model.py download --manifest deploy/model/xenova-clip-vit-base-patch32.toml \\
        -o models/clip-vit-b-32 [--repo Xenova/clip-vit-base-patch32] [--revision main]
        [--base-url URL] [--timeout 30] [--connect-timeout 5] [--retries 3] [--force]
    fetch_model.py check DIR [--quick]
    fetch_model.py find MODELS_DIR

`download` fetches {base}/{repo}/resolve/{revision}/{path} for the image tower and the text
tower. The remote paths come from the manifest's [source] table (image_file, text_file;
default onnx/vision_model.onnx and onnx/text_model.onnx), the local names from its
[image] file / [text] file (image.onnx, text.onnx). The hub base URL is --base-url, else
the environment variable OODGATE_HF_BASE, else the Hugging Face hub.

  * A quick reachability probe (DNS + TCP connect, --connect-timeout seconds) runs first,
    so an offline machine gives up in a few seconds.
  * Each file goes to DIR/<name>.part. An interrupted download (dropped connection, short
    response, timeout, Ctrl-C) is resumed with an HTTP Range request, in this run (up to
    --retries more attempts) or the next one. A server that ignores Range (200 instead of
    206) or answers with the wrong Content-Range restarts the file from byte 0.
  * When the server states the file's SHA-256 (the hub's X-Linked-Etag header for LFS
    files), the download is checked against it; a mismatch restarts the file.
  * Validation (onnxruntime, CPU): each file loads, has the input and output names the
    manifest gives ([image] input/output; [text] input/output/attention_mask), and one run
    (a zero image batch; a [SOT, EOT, pad...] token row) gives a finite [1, embed_dim]
    output. If a file fails, all downloaded files are deleted and nothing is installed.
  * Then the files are renamed into place and model.toml is written last, atomically: a copy
    of the manifest whose [source] table records the repo, revision, commit (when the server
    says), remote paths and the SHA-256 of each file. A folder with a model.toml is complete.

`check DIR` validates an existing model folder the same way (plus the SHA-256 recorded in
its [source] table, if any); `--quick` only parses the manifest and checks the files exist.
`find MODELS_DIR` prints the first subfolder (sorted by name) whose manifest says
weights = "pretrained" and passes the quick check.

Exit codes: 0 ok; 1 usage or local error (bad manifest, onnxruntime missing, disk);
2 the files could not be downloaded (network unreachable, timeout, HTTP error) - the caller
may fall through to another way of getting a model; 3 invalid content (not the expected
model); `find` exits 1 when no folder qualifies.

The download uses only the standard library (urllib); validation needs numpy and
onnxruntime (the project venv, deploy/setup/venv.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE_URL = "https://huggingface.co"
DEFAULT_REMOTE = {"image": "onnx/vision_model.onnx", "text": "onnx/text_model.onnx"}
MANIFEST_FILES = ("model.toml", "model.json")  # the order oodgate looks for them
USER_AGENT = "oodgate-fetch_model/1"
CHUNK = 1 << 20
SOT_ID, EOT_ID = 49406, 49407

EXIT_OK, EXIT_ERROR, EXIT_UNAVAILABLE, EXIT_INVALID = 0, 1, 2, 3


class Error(Exception):
    """A local problem (usage, manifest, disk): exit 1."""
    code = EXIT_ERROR


class Unavailable(Error):
    """The files could not be downloaded: exit 2."""
    code = EXIT_UNAVAILABLE


class InvalidContent(Error):
    """The files are not the model the manifest describes: exit 3."""
    code = EXIT_INVALID


class Transient(Exception):
    """A failed attempt that is worth retrying (the .part file keeps what arrived)."""


class HashMismatch(Transient):
    pass


def log(msg: str) -> None:
    print(f"fetch_model: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- manifest

@dataclass(frozen=True)
class Tower:
    kind: str               # "image" | "text"
    file: str               # local file name (relative to the model folder)
    remote: str             # path inside the hub repository
    input: str
    output: str
    attention_mask: str | None = None


def read_manifest(path: Path) -> dict:
    try:
        raw = path.read_bytes()
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except OSError as e:
        raise Error(f"{path}: {e.strerror or e}")
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and JSONDecodeError
        raise Error(f"{path}: not a valid manifest: {e}")
    for key in ("weights", "embed_dim", "image"):
        if key not in data:
            raise Error(f"{path}: the manifest has no {key!r}")
    return data


def towers(manifest: dict) -> list[Tower]:
    """The encoder files of a manifest, with oodgate's defaults for names left out."""
    try:
        source = manifest.get("source") or {}
        image = manifest["image"]
        out = [Tower("image", image["file"], source.get("image_file", DEFAULT_REMOTE["image"]),
                     image.get("input", "image"), image.get("output", "embedding"))]
        text = manifest.get("text")
        if text is not None:
            out.append(Tower("text", text["file"],
                             source.get("text_file", DEFAULT_REMOTE["text"]),
                             text.get("input", "tokens"), text.get("output", "embedding"),
                             text.get("attention_mask")))
    except (KeyError, TypeError, AttributeError) as e:
        raise Error(f"the manifest's [image] / [text] tables are incomplete (missing {e})")
    return out


def find_manifest(folder: Path) -> Path | None:
    return next((folder / f for f in MANIFEST_FILES if (folder / f).is_file()), None)


def quick_check(folder: Path) -> dict:
    """Parses the folder's manifest and checks its files exist; returns the manifest."""
    path = find_manifest(folder)
    if path is None:
        raise InvalidContent(f"{folder}: no model.toml or model.json")
    try:
        manifest = read_manifest(path)
    except Error as e:
        raise InvalidContent(str(e))
    try:
        tws = towers(manifest)
    except Error as e:
        raise InvalidContent(f"{path}: {e}")
    for t in tws:
        f = folder / t.file
        if not f.is_file() or f.stat().st_size == 0:
            raise InvalidContent(f"{f}: missing or empty ({t.kind} tower)")
    return manifest


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def with_source(text: str, updates: dict) -> str:
    """The manifest text with `updates` set in its [source] table (other keys kept)."""
    lines = text.rstrip("\n").split("\n")
    start = next((i for i, l in enumerate(lines)
                  if re.match(r"\s*\[source\]\s*(#.*)?$", l)), None)
    new = [f"{k} = {toml_value(v)}" for k, v in updates.items()]
    if start is None:
        return "\n".join(lines + ["[source]"] + new) + "\n"
    end = next((j for j in range(start + 1, len(lines)) if re.match(r"\s*\[", lines[j])),
               len(lines))

    def keep(line: str) -> bool:
        key = re.match(r"\s*([A-Za-z0-9_-]+)\s*=", line)
        if key and key.group(1) in updates:
            return False
        # the shipped manifest's "hashes not recorded" note no longer applies
        return not re.match(r"\s*#.*\b(image|text)_sha256\b", line)

    section = [lines[start]] + [l for l in lines[start + 1:end] if keep(l)] + new
    return "\n".join(lines[:start] + section + lines[end:]) + "\n"


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- validation

def validate(path: Path, tower: Tower, manifest: dict, label: str) -> None:
    """Loads an encoder file with onnxruntime and runs it once; raises InvalidContent."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        raise Error(f"validation needs numpy and onnxruntime ({e}); run deploy/setup/venv.sh "
                    "and use .venv/bin/python")

    def bad(what: str) -> InvalidContent:
        return InvalidContent(f"{label} ({tower.kind} tower): {what}")

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise bad(f"onnxruntime cannot load it as an ONNX model: {first}")
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    wanted = [tower.input] + ([tower.attention_mask] if tower.attention_mask else [])
    for name in wanted:
        if name not in inputs:
            raise bad(f"no input named {name!r} (it has: {', '.join(inputs) or 'none'}); "
                      f"is this the model the manifest describes?")
    extra = [n for n in inputs if n not in wanted]
    if extra:
        raise bad(f"it also needs the input(s) {', '.join(extra)}, which the manifest does "
                  "not name")
    if tower.output not in outputs:
        raise bad(f"no output named {tower.output!r} (it has: {', '.join(outputs)})")

    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}

    def dtype_of(name: str, allowed: tuple[str, ...]):
        t = inputs[name].type
        if t not in allowed:
            raise bad(f"input {name!r} has type {t}, expected {' or '.join(allowed)}")
        return dtypes[t]

    if tower.kind == "image":
        size = int(manifest["image"].get("size", 224))
        dt = dtype_of(tower.input, ("tensor(float)", "tensor(float16)"))
        feed = {tower.input: np.zeros((1, 3, size, size), dt)}
    else:
        text = manifest["text"]
        length = int(text.get("context_length", 77))
        ids = [SOT_ID, EOT_ID] + [int(text.get("pad_id", 0))] * (length - 2)
        feed = {tower.input: np.array([ids], dtype_of(tower.input, ("tensor(int64)",
                                                                      "tensor(int32)")))}
        if tower.attention_mask:
            dt = dtype_of(tower.attention_mask, ("tensor(int64)", "tensor(int32)"))
            feed[tower.attention_mask] = np.array([[1, 1] + [0] * (length - 2)], dt)
    try:
        out = sess.run([tower.output], feed)[0]
    except Exception as e:  # noqa: BLE001
        raise bad(f"a test run failed: {str(e).strip().splitlines()[0]}")
    dim = int(manifest["embed_dim"])
    if tuple(out.shape) != (1, dim):
        raise bad(f"output {tower.output!r} has shape {list(out.shape)}, expected [1, {dim}] "
                  "(batch 1, manifest embed_dim)")
    if not np.all(np.isfinite(out)):
        raise bad(f"output {tower.output!r} is not finite on a test input")


# ----------------------------------------------------------------------------- download

@dataclass
class Fetched:
    size: int
    sha256: str
    commit: str | None  # X-Repo-Commit, when the server sends it


def probe(url: str, timeout: float) -> None:
    """Raises Unavailable unless a TCP connection to the URL's host (or its proxy) opens
    within `timeout` seconds, DNS included."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise Error(f"--base-url {url!r} is not an http(s) URL")
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname or host, p.port or 80
    result: dict = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    # getaddrinfo has no timeout of its own, hence the thread (daemon: never waited for)
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    if "ok" not in result:
        why = result.get("error") or f"no answer within {timeout:g} s"
        raise Unavailable(f"{host}:{port} is not reachable ({why})")


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib does, keeping each hop's headers (the hub sends the
    file's SHA-256 and the commit on the first response, which redirects to a CDN)."""

    def __init__(self) -> None:
        super().__init__()
        self.hops: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _header(hops: list, name: str) -> str | None:
    for h in hops:
        if h.get(name):
            return h.get(name).strip()
    return None


def _fetch_once(url: str, part: Path, timeout: float, label: str) -> tuple[str | None, str | None]:
    """One attempt: appends to (or restarts) `part` until the file is complete. Returns the
    server's SHA-256 and commit headers. Raises Transient, Unavailable."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                               "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    redirects = _RecordRedirects()
    opener = urllib.request.build_opener(redirects)
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        hops = redirects.hops + [e.headers]
        if e.code == 416 and offset:  # nothing left after `offset`: complete, or stale
            total = re.fullmatch(r"bytes \*/(\d+)", e.headers.get("Content-Range", "") or "")
            if total and int(total.group(1)) == offset:
                return _header(hops, "X-Linked-Etag"), _header(hops, "X-Repo-Commit")
            part.unlink()
            raise Transient("the server refused to resume the partial file; restarting it")
        if e.code in (408, 425, 429) or e.code >= 500:
            raise Transient(f"HTTP {e.code} {e.reason}")
        hint = {401: " (private or gated repository?)", 403: " (private or gated repository?)",
                404: " (check --repo, --revision and the manifest's [source] paths)"}
        raise Unavailable(f"{url}: HTTP {e.code} {e.reason}{hint.get(e.code, '')}")
    except (OSError, ValueError, http.client.HTTPException) as e:  # refused, DNS, TLS, timeout
        raise Transient(str(getattr(e, "reason", None) or e) or type(e).__name__)

    with resp:
        hops = redirects.hops + [resp.headers]
        status = resp.status
        length = resp.headers.get("Content-Length")
        if status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink()
                raise Transient("unexpected Content-Range in the resumed response; restarting")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        elif status == 200:
            if offset:
                log(f"{label}: the server ignored the Range request; restarting from byte 0")
            offset, mode = 0, "wb"
            total = int(length) if length and length.isdigit() else None
        else:
            raise Transient(f"unexpected HTTP status {status}")

        size, last_report = offset, time.monotonic()
        try:
            with open(part, mode) as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    size += len(chunk)
                    if time.monotonic() - last_report > 5:
                        last_report = time.monotonic()
                        of = f" of {total / 1e6:.1f}" if total else ""
                        log(f"{label}: {size / 1e6:.1f}{of} MB")
                f.flush()
                os.fsync(f.fileno())
        except (OSError, ValueError, http.client.HTTPException) as e:  # reset, timeout
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Error(f"{part}: {e}")
            raise Transient(f"connection lost after {size} bytes ({e or type(e).__name__})")
    if total is not None and size < total:
        raise Transient(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        part.unlink()
        raise Transient(f"received {size} bytes, more than the {total} announced; restarting")
    return _header(hops, "X-Linked-Etag"), _header(hops, "X-Repo-Commit")


def fetch(url: str, part: Path, label: str, timeout: float, retries: int,
          retry_wait: float) -> Fetched:
    """Downloads `url` into `part` (resuming what is there), with retries."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            wait = retry_wait * 2 ** (attempt - 1)
            log(f"{label}: {last}; retry {attempt}/{retries} in {wait:g} s")
            time.sleep(wait)
        try:
            t0 = time.monotonic()
            etag, commit = _fetch_once(url, part, timeout, label)
            digest = sha256_file(part)
            want = (etag or "").removeprefix("W/").strip('"').lower()
            if re.fullmatch(r"[0-9a-f]{64}", want) and digest != want:
                part.unlink()
                raise HashMismatch(f"SHA-256 {digest} differs from the server's {want}")
            size = part.stat().st_size
            log(f"{label}: {size / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s")
            return Fetched(size, digest, commit)
        except Transient as e:
            last = e
    if isinstance(last, HashMismatch):
        raise InvalidContent(f"{label}: {last}")
    raise Unavailable(f"{label}: {last} (gave up after {retries + 1} attempts)")


@contextlib.contextmanager
def folder_lock(folder: Path):
    """One download per folder at a time (two `make run`s would share the .part files).
    The lock is on the folder itself, so no lock file is left behind."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{folder} is being downloaded by another process; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def install(a: argparse.Namespace, out: Path, manifest: dict, manifest_text: str, repo: str,
            base: str) -> None:
    """Downloads, validates and installs the encoder files, then writes model.toml."""
    tws = towers(manifest)
    with contextlib.suppress(FileNotFoundError):
        (out / "model.toml").unlink()  # the folder is incomplete until model.toml is back
    fetched: dict[Tower, Fetched] = {}
    for t in tws:
        revision = urllib.parse.quote(a.revision, safe="")
        url = f"{base}/{repo}/resolve/{revision}/{t.remote}"
        part = out / f"{t.file}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        log(f"downloading {url}" + (f" (resuming at byte {have})" if have else ""))
        fetched[t] = fetch(url, part, t.remote, a.timeout, a.retries, a.retry_wait)

    problems = []
    for t in tws:
        try:
            validate(out / f"{t.file}.part", t, manifest, t.remote)
        except InvalidContent as e:
            problems.append(str(e))
    if problems:
        for t in tws:
            with contextlib.suppress(FileNotFoundError):
                (out / f"{t.file}.part").unlink()
        raise InvalidContent("downloaded files rejected and deleted:\n  " + "\n  ".join(problems))

    for t in tws:
        os.replace(out / f"{t.file}.part", out / t.file)
    updates: dict = {"repo": repo, "revision": a.revision}
    commits = {f.commit for f in fetched.values()}
    if len(commits) == 1 and None not in commits:
        updates["commit"] = commits.pop()
    if base != DEFAULT_BASE_URL:
        updates["base_url"] = base
    for t in tws:
        updates[f"{t.kind}_file"] = t.remote
        updates[f"{t.kind}_sha256"] = fetched[t].sha256
    updates["fetched_by"] = "deploy/model/fetch_model.py"
    text = with_source(manifest_text, updates)

    def without_source(m: dict) -> dict:
        return {k: v for k, v in m.items() if k != "source"}

    try:
        same = without_source(tomllib.loads(text)) == without_source(manifest)
    except tomllib.TOMLDecodeError as e:
        same = False
        log(f"the rewritten manifest does not parse: {e}")
    if not same:
        raise Error(f"{a.manifest}: cannot record the download in its [source] table (keep "
                    "[source] a plain [source] table)")
    write_atomic(out / "model.toml", text.encode("utf-8"))


def cmd_download(a: argparse.Namespace) -> int:
    if a.manifest.suffix != ".toml":
        raise Error(f"{a.manifest}: the manifest must be a TOML file (it becomes model.toml)")
    manifest = read_manifest(a.manifest)
    manifest_text = a.manifest.read_text(encoding="utf-8")
    try:
        towers(manifest)
    except Error as e:
        raise Error(f"{a.manifest}: {e}")
    repo = a.repo or (manifest.get("source") or {}).get("repo")
    if not repo:
        raise Error("--repo is required (the manifest's [source] has no repo)")
    base = (a.base_url or os.environ.get("OODGATE_HF_BASE") or DEFAULT_BASE_URL).rstrip("/")
    out: Path = a.out

    def present() -> bool:
        """True when `out` already holds a complete download of this repository."""
        if a.force or not (out / "model.toml").exists():
            return False
        try:
            have = quick_check(out)
        except InvalidContent as e:
            log(f"{e}; downloading again")
            return False
        if (have.get("source") or {}).get("repo") != repo:
            raise Error(f"{out} already holds another model ({have.get('name', '?')}); "
                        "pass --force to replace it")
        log(f"{out}: already present ({repo})")
        return True

    if present():
        return EXIT_OK
    probe(base, a.connect_timeout)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        if present():  # another process finished it while we waited for the lock
            return EXIT_OK
        try:
            install(a, out, manifest, manifest_text, repo, base)
        except Error:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: partial downloads stay for the next run
            raise
    log(f"{out}: ready ({manifest.get('name', repo)})")
    return EXIT_OK


def cmd_check(a: argparse.Namespace) -> int:
    manifest = quick_check(a.dir)
    if not a.quick:
        source = manifest.get("source") or {}
        for t in towers(manifest):
            path = a.dir / t.file
            validate(path, t, manifest, str(path))
            want = source.get(f"{t.kind}_sha256")
            if isinstance(want, str) and re.fullmatch(r"[0-9a-f]{64}", want):
                got = sha256_file(path)
                if got != want:
                    raise InvalidContent(f"{path}: SHA-256 {got} differs from the manifest's "
                                         f"{t.kind}_sha256 {want}")
    log(f"{a.dir}: ok ({manifest.get('name', '?')}, weights = {manifest.get('weights')!r}"
        f"{', quick check' if a.quick else ''})")
    return EXIT_OK


def cmd_find(a: argparse.Namespace) -> int:
    folders = sorted(p for p in a.models_dir.iterdir() if p.is_dir()) \
        if a.models_dir.is_dir() else []
    for folder in folders:
        if find_manifest(folder) is None:
            continue
        try:
            manifest = quick_check(folder)
        except InvalidContent as e:
            log(f"skipping {e}")
            continue
        if manifest.get("weights") == "pretrained":
            print(folder)
            return EXIT_OK
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="exit codes: 0 ok, 1 error, 2 download failed, "
                                        "3 invalid content")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="download, validate and install a model folder")
    d.add_argument("--manifest", type=Path, required=True,
                   help="oodgate manifest describing the files (copied as model.toml)")
    d.add_argument("-o", "--out", type=Path, required=True, help="model folder to write")
    d.add_argument("--repo", help="hub repository (default: the manifest's [source] repo)")
    d.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    d.add_argument("--base-url", help="hub base URL (default: $OODGATE_HF_BASE, else "
                                      f"{DEFAULT_BASE_URL})")
    d.add_argument("--timeout", type=float, default=30.0,
                   help="seconds without data before an attempt fails (default 30)")
    d.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds for the reachability probe (default 5)")
    d.add_argument("--retries", type=int, default=3, help="retries per file (default 3)")
    d.add_argument("--retry-wait", type=float, default=1.0,
                   help="seconds before the first retry, doubled each time (default 1)")
    d.add_argument("--force", action="store_true", help="download even if DIR is complete")
    c = sub.add_parser("check", help="validate an existing model folder")
    c.add_argument("dir", type=Path)
    c.add_argument("--quick", action="store_true",
                   help="only parse the manifest and check that the files exist")
    f = sub.add_parser("find", help="print the first pretrained model folder in MODELS_DIR")
    f.add_argument("models_dir", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "download" and (a.retries < 0 or a.timeout <= 0 or a.connect_timeout <= 0):
        ap.error("--retries must be >= 0 and the timeouts > 0")
    try:
        return {"download": cmd_download, "check": cmd_check, "find": cmd_find}[a.cmd](a)
    except Error as e:
        kind = {EXIT_UNAVAILABLE: "download failed", EXIT_INVALID: "invalid model"}
        log(f"{kind.get(e.code, 'error')}: {e}")
        return e.code
    except OSError as e:  # disk full, permissions, ...
        log(f"error: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        log("interrupted; run again to resume the download")
        return 130


if __name__ == "__main__":
    sys.exit(main())
