"""Resumable downloads, checksums and safe archive access for the Face9M sources.

The paper (Sec. 3.1, "Face9M") pretrains on images gathered from eight public face datasets.
Those come as large files from flaky hosts (cloud drives, mirrors) and as zip/tar archives of
unknown provenance, so this module provides three careful building blocks, standard library
only:

- :func:`fetch`: stream a URL to ``<dest>.part``, resume a partial file with an HTTP Range
  request (and restart when the server ignores Range), retry connection errors and 5xx
  answers with exponential backoff, verify size and md5/sha256, then move the file into
  place. A file that fails its checksum is renamed to ``<dest>.bad`` so it is never used.
- :func:`safe_extract`: extract a zip or tar(.gz/.bz2/.xz) only after every member passed the
  checks: no absolute paths, no ``..`` components, no symbolic or hard links, no device
  files; nothing is written when a single member fails.
- :func:`iter_archive_members` / :func:`read_member`: list and read regular-file members in
  place, without extracting; open archives are cached per process (:class:`HandleCache`),
  so reading many members from worker processes stays cheap. ``read_member(..., max_bytes=)``
  streams at most ``max_bytes + 1`` bytes, so a member that unpacks to far more than it
  should (a zip bomb) never goes to memory (:class:`TooLargeError`).
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20          # bytes per read/write while streaming a download
USER_AGENT = "fmae-iat-pipeline/1.0 (+python urllib)"
# HTTP statuses worth retrying: timeouts, rate limits and server-side failures.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
PROGRESS_EVERY_S = 30.0       # one progress log line per this many seconds

ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class DownloadError(RuntimeError):
    """A download failed for good (retries exhausted, or a non-retryable HTTP status)."""


class ChecksumError(DownloadError):
    """A downloaded or placed file does not match its expected size or checksum."""


class UnsafeArchiveError(ValueError):
    """An archive holds a member that could write outside the target folder."""


class TooLargeError(ValueError):
    """A file or archive member holds more bytes than the caller's ``max_bytes``."""


class _Retryable(Exception):
    """Internal: a transient network failure; the caller retries (and resumes)."""


# --------------------------------------------------------------------------- checksums
def file_digests(path: str | Path, algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of ``path`` for each algorithm (``"md5"``, ``"sha256"``), in one read."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_SIZE)
            if not block:
                break
            for h in hashers.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashers.items()}


def check_file(path: str | Path, *, sha256: str | None = None, md5: str | None = None,
               size: int | None = None) -> str | None:
    """Compare a file with its expected size and checksums.

    Returns None when everything given matches, else a sentence describing the first
    mismatch ("md5: expected ..., got ..."), for error messages.
    """
    path = Path(path)
    st = path.stat()
    if size is not None and st.st_size != size:
        return f"size: expected {size} bytes, got {st.st_size}"
    algos = tuple(a for a, v in (("sha256", sha256), ("md5", md5)) if v)
    if not algos:
        return None
    # Hashing a multi-GB archive takes a while: remember files that passed in this process
    # (keyed by size and mtime, so a modified file is hashed again).
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns, sha256, md5)
    if memo in _VERIFIED:
        return None
    got = file_digests(path, algos)
    for algo, want in (("sha256", sha256), ("md5", md5)):
        if want and got[algo] != want.lower():
            return f"{algo}: expected {want.lower()}, got {got[algo]}"
    _VERIFIED.add(memo)
    return None


_VERIFIED: set[tuple] = set()


# --------------------------------------------------------------------------- HTTP
def fetch(url: str, dest: str | Path, *, sha256: str | None = None, md5: str | None = None,
          size: int | None = None, retries: int = 5, timeout: float = 60.0,
          backoff: float = 2.0, max_backoff: float = 120.0,
          chunk_size: int = CHUNK_SIZE) -> Path:
    """Download ``url`` to ``dest`` with resume, retries and checksum verification.

    Bytes stream into ``<dest>.part``; an existing ``.part`` (an interrupted run) is resumed
    with ``Range: bytes=<size>-``. A server answering 200 instead of 206 ignored the Range
    header, so the file restarts from byte 0. Only a complete, verified file is renamed to
    ``dest``; a ``dest`` that already exists and verifies is returned without any request.

    Args:
        url: http(s) URL (anything ``urllib`` opens works).
        dest: final path of the file.
        sha256, md5: expected hex digests (either, both or none).
        size: expected size in bytes; also guards against a server sending another file.
        retries: how many consecutive failed attempts *without new data* are retried; an
            attempt that grew the ``.part`` file resets the count, so a long download over a
            flaky link keeps going while a dead server fails after ``retries + 1`` requests.
        timeout: socket timeout in seconds for connecting and for each read.
        backoff: seconds before the first retry, doubled per further failure (0 = none).
        max_backoff: cap on the wait between retries.
        chunk_size: bytes per read.

    Raises:
        ChecksumError: the finished download does not match; it was renamed to ``.bad``.
        DownloadError: a non-retryable HTTP status, or retries exhausted (``.part`` is kept
            so the next run resumes).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    bad = dest.with_name(dest.name + ".bad")
    if dest.exists():
        problem = check_file(dest, sha256=sha256, md5=md5, size=size)
        if problem is None:
            log.info("%s: already downloaded and verified", dest)
            return dest
        log.warning("%s: existing file does not verify (%s); moved to %s, downloading again",
                    dest, problem, bad)
        os.replace(dest, bad)
    dest.parent.mkdir(parents=True, exist_ok=True)

    failures = 0
    high_water = part.stat().st_size if part.exists() else 0
    while True:
        try:
            _transfer(url, part, size=size, timeout=timeout, chunk_size=chunk_size)
            break
        except _Retryable as e:
            now = part.stat().st_size if part.exists() else 0
            if now > high_water:  # progress was made: a flaky link, not a dead server
                high_water, failures = now, 0
            failures += 1
            if failures > retries:
                # Name the .part file only when it exists: a message pointing at a file that
                # is not there sends the user looking for it.
                kept = (f"{now} bytes are kept in {part}; re-run to resume, or"
                        if now else "nothing was received; re-run to try again, or")
                raise DownloadError(
                    f"{url}: download failed after {failures} attempt(s) without progress; "
                    f"last error: {e}. {kept} download the file by hand to {dest}") from None
            delay = min(backoff * 2 ** (failures - 1), max_backoff)
            log.warning("%s: %s; retry %d of %d in %.1f s", url, e, failures, retries, delay)
            if delay > 0:
                time.sleep(delay)

    problem = check_file(part, sha256=sha256, md5=md5, size=size)
    if problem is not None:
        os.replace(part, bad)  # keep it for inspection, but where nothing will use it
        raise ChecksumError(
            f"{url}: the downloaded file {dest} does not match ({problem}). It was moved to "
            f"{bad} and is not used; re-run to download it again from scratch. If this "
            f"repeats, the server sends a different file (an error page, quota notice or a "
            f"new version): download it by hand and check it.")
    os.replace(part, dest)
    log.info("%s: downloaded and verified (%d bytes)", dest, dest.stat().st_size)
    return dest


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``"bytes 100-199/1000"`` -> (100, 1000); ``"bytes */1000"`` -> (None, 1000)."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _transfer(url: str, part: Path, *, size: int | None, timeout: float,
              chunk_size: int) -> None:
    """One attempt: append to (or restart) ``part``; raises _Retryable on transient errors."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:  # a stale .part from another file version
        log.warning("%s: %d bytes, more than the expected %d; restarting", part, offset, size)
        part.unlink()
        offset = 0
    if size is not None and offset == size and offset > 0:
        return  # everything arrived before the interruption; only verification is left
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and offset:
                # Range not satisfiable: the .part is as long as the file (done) or longer.
                _, total = _content_range(e.headers.get("Content-Range"))
                if total == offset:
                    return
                part.unlink()
                raise _Retryable(f"HTTP 416 when resuming at byte {offset}; restarting "
                                 "from the beginning") from None
            if e.code in RETRY_STATUSES:
                raise _Retryable(f"HTTP {e.code} {e.reason}") from None
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; the server refused the "
                                "download (check the URL, or download the file by hand)"
                                ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None

    with resp:
        status = getattr(resp, "status", None) or 200
        if offset and status == 206:
            start, _ = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Retryable(f"server resumed at byte {start}, not {offset}; restarting")
            mode = "ab"
        else:
            if offset:
                log.info("%s: the server ignored the Range request; downloading from the "
                         "start", url)
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        body = int(length) if length and length.isdigit() else None
        if size is not None and body is not None and offset + body != size:
            raise DownloadError(
                f"{url}: the server sends {offset + body} bytes but {size} are expected; "
                f"it is serving another file (an error page, quota notice or a new version). "
                f"Download it by hand to {part.with_suffix('')}")
        total = offset + body if body is not None else size
        received, last_log, t0 = 0, time.monotonic(), time.monotonic()
        with open(part, mode) as f:
            while True:
                try:
                    chunk = resp.read(chunk_size)
                except (http.client.HTTPException, OSError) as e:
                    raise _Retryable(f"connection lost after {offset + received} bytes "
                                     f"({type(e).__name__}: {e})") from None
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                now = time.monotonic()
                if now - last_log >= PROGRESS_EVERY_S:
                    last_log = now
                    rate = received / max(now - t0, 1e-6) / 2**20
                    done = f" of {total / 2**20:.1f} MiB" if total else " MiB"
                    log.info("%s: %.1f%s, %.1f MiB/s", part.name,
                             (offset + received) / 2**20, done, rate)
        # http.client returns a short body without an error when the peer closes early.
        if body is not None and received < body:
            raise _Retryable(f"connection closed after {offset + received} of "
                             f"{offset + body} bytes")


# --------------------------------------------------------------------------- archives
@dataclass(frozen=True)
class ArchiveMember:
    """A regular file inside a zip or tar archive."""
    name: str
    size: int


def archive_kind(path: str | Path) -> str | None:
    """``"zip"``, ``"tar"`` or None, from the file name (case-insensitive)."""
    name = Path(path).name.lower()
    if name.endswith(ZIP_SUFFIXES):
        return "zip"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    return None


def _sniff_kind(path: Path) -> str:
    kind = archive_kind(path)
    if kind is None:
        if zipfile.is_zipfile(path):
            kind = "zip"
        elif tarfile.is_tarfile(path):
            kind = "tar"
        else:
            raise ValueError(f"{path}: not a zip or tar archive (supported: "
                             f"{', '.join(ZIP_SUFFIXES + TAR_SUFFIXES)})")
    return kind


def member_name_problem(name: str) -> str | None:
    """Why an archive member name is unsafe to write below a folder, or None if it is safe.

    Backslashes count as separators too: an archive made on Windows may use them, and
    ``..\\..\\x`` must not slip through on a system that would treat it as one file name.
    """
    if not name or "\x00" in name:
        return "an empty name or a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[\\/]+", name):
        return "a '..' path component"
    return None


def _zip_entry_type(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16  # Unix mode bits, when the creator stored them
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "device"
    return "dir" if info.is_dir() else "file"


def _tar_entry_type(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr() or info.isblk() or info.isfifo():
        return "device"
    if info.isdir():
        return "dir"
    if info.isreg():
        return "file"
    return "other"


def _entries(archive: Path, kind: str) -> list[tuple[str, str, str]]:
    """(name, type, link target) of every member, in archive order."""
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            out = []
            for info in zf.infolist():
                t = _zip_entry_type(info)
                target = zf.read(info).decode("utf-8", "replace") if t == "symlink" else ""
                out.append((info.filename, t, target))
            return out
    with tarfile.open(archive, "r:*") as tf:
        return [(ti.name, _tar_entry_type(ti), ti.linkname) for ti in tf]


def safe_extract(archive: str | Path, target: str | Path) -> list[Path]:
    """Extract a zip or tar archive below ``target``, refusing anything that could escape.

    Every member is checked before anything is written; the archive is refused as a whole
    (nothing extracted) if one member has an absolute path or a ``..`` component, is a
    symbolic or hard link (to anywhere: a link inside the target can still be followed
    out by a later member), a device/FIFO, or would resolve outside ``target``. Regular files
    are written with default permissions (no setuid bits, owners or timestamps from the
    archive).

    Returns:
        The extracted files, in archive order.

    Raises:
        UnsafeArchiveError: naming the archive and the offending members.
        ValueError: the file is neither a zip nor a tar archive.
    """
    archive, target = Path(archive), Path(target)
    kind = _sniff_kind(archive)
    root = target.resolve()
    problems = []
    for name, etype, link in _entries(archive, kind):
        why = member_name_problem(name)
        if why is None and etype in ("symlink", "hardlink"):
            why = f"a {'symbolic' if etype == 'symlink' else 'hard'} link (-> {link!r})"
        elif why is None and etype in ("device", "other"):
            why = "a device, FIFO or other special file"
        elif why is None and not (root / name).resolve().is_relative_to(root):
            why = f"a path that resolves outside {target}"
        if why:
            problems.append(f"{name!r} is {why}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UnsafeArchiveError(
            f"{archive}: refusing to extract; nothing was written. Unsafe member(s): "
            f"{'; '.join(problems[:5])}{more}. Check where this archive came from.")

    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def _write(name: str, src) -> None:
        out = target / name
        out.parent.mkdir(parents=True, exist_ok=True)
        # A symlink already present inside the target could redirect the write: re-check.
        if out.is_symlink() or not out.parent.resolve().is_relative_to(root):
            raise UnsafeArchiveError(f"{archive}: member {name!r} would be written through a "
                                     f"symbolic link already present in {target}; refused")
        with open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK_SIZE)
        written.append(out)

    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    (target / info.filename).mkdir(parents=True, exist_ok=True)
                else:
                    with zf.open(info) as src:
                        _write(info.filename, src)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for ti in tf:
                if ti.isdir():
                    (target / ti.name).mkdir(parents=True, exist_ok=True)
                elif ti.isreg():
                    src = tf.extractfile(ti)
                    with src:
                        _write(ti.name, src)
    log.info("%s: extracted %d files into %s", archive, len(written), target)
    return written


def iter_archive_members(path: str | Path) -> Iterator[ArchiveMember]:
    """Regular-file members of a zip or tar archive, in archive order, without extracting.

    Links, devices and members with unsafe names (absolute, ``..``) are skipped with a
    warning: reading in place never follows them. Tars are streamed, so a compressed tar is
    decompressed once, front to back.
    """
    path = Path(path)
    kind = _sniff_kind(path)
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                t = _zip_entry_type(info)
                if t == "dir":
                    continue
                if t != "file" or member_name_problem(info.filename):
                    log.warning("%s: skipping member %r (%s)", path, info.filename,
                                member_name_problem(info.filename) or t)
                    continue
                yield ArchiveMember(info.filename, info.file_size)
        return
    try:
        with tarfile.open(path, "r:*") as tf:
            for ti in tf:
                t = _tar_entry_type(ti)
                if t == "dir":
                    continue
                if t != "file" or member_name_problem(ti.name):
                    log.warning("%s: skipping member %r (%s)", path, ti.name,
                                member_name_problem(ti.name) or t)
                    continue
                yield ArchiveMember(ti.name, ti.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path}: unreadable tar archive ({type(e).__name__}: {e}); it is "
                         "probably truncated: delete it and download or place it again") from e


class HandleCache:
    """A per-process LRU of open handles (archives, record files), safe across ``fork``.

    Worker processes forked from a parent that already opened an archive would share its file
    offsets, and interleaved seeks would read garbage; the cache therefore notices a new
    process id and starts empty there. Reads go through :meth:`use`, which holds a lock, so
    threads in one process do not interleave seeks either.
    """

    def __init__(self, opener: Callable[[str], Any], max_open: int = 32):
        self._opener = opener
        self._max_open = max_open
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._open: OrderedDict[str, Any] = OrderedDict()

    def use(self, path: str, fn: Callable[[Any], Any]) -> Any:
        """Call ``fn(handle)`` with the open handle for ``path`` (opening it if needed)."""
        if os.getpid() != self._pid:
            # Handles inherited from the parent share its file offsets: forget them (this
            # process's copies of the descriptors close when the objects are collected).
            self._reset()
        with self._lock:
            handle = self._open.get(path)
            if handle is None:
                handle = self._opener(path)
                self._open[path] = handle
                while len(self._open) > self._max_open:
                    _, old = self._open.popitem(last=False)
                    old.close()
            else:
                self._open.move_to_end(path)
            return fn(handle)

    def clear(self) -> None:
        """Close every handle this process opened."""
        if os.getpid() == self._pid:
            with self._lock:
                for h in self._open.values():
                    h.close()
        self._reset()


# The open handles below keep these attributes for readers outside this module
# (pipeline/shards.py reads ``zf``, ``tf`` and ``index``): ``read(name, limit)`` returns at most
# ``limit`` bytes (all when None), ``size(name)`` the size the archive declares.
class _OpenTar:
    """An open tar with a name -> member index (first occurrence wins, as enumeration)."""

    def __init__(self, path: str):
        self.tf = tarfile.open(path, "r:*")
        self.index: dict[str, tarfile.TarInfo] = {}
        for ti in self.tf.getmembers():
            self.index.setdefault(ti.name, ti)

    def _info(self, name: str) -> tarfile.TarInfo:
        ti = self.index[name]
        if not ti.isreg():
            raise KeyError(name)
        return ti

    def size(self, name: str) -> int:
        return self._info(name).size

    def read(self, name: str, limit: int | None = None) -> bytes:
        f = self.tf.extractfile(self._info(name))
        with f:
            return f.read() if limit is None else f.read(limit)

    def close(self) -> None:
        self.tf.close()


class _OpenZip:
    def __init__(self, path: str):
        self.zf = zipfile.ZipFile(path)

    def size(self, name: str) -> int:
        return self.zf.getinfo(name).file_size

    def read(self, name: str, limit: int | None = None) -> bytes:
        if limit is None:
            return self.zf.read(name)
        # A stream: ZipFile.read would inflate everything the member holds first.
        with self.zf.open(name) as f:
            return f.read(limit)

    def close(self) -> None:
        self.zf.close()


def _open_archive(path: str) -> _OpenTar | _OpenZip:
    return _OpenZip(path) if _sniff_kind(Path(path)) == "zip" else _OpenTar(path)


ARCHIVES = HandleCache(_open_archive)


def read_member(archive: str | Path, name: str, max_bytes: int | None = None) -> bytes:
    """The bytes of member ``name`` of a zip or tar archive, read in place.

    The archive stays open in this process (see :class:`HandleCache`). Reading a tar builds
    its member index once; for a compressed tar, members are cheapest to read in archive
    order (gzip streams cannot seek backwards without starting over).

    Args:
        max_bytes: refuse a member larger than this many bytes (None: no limit). A member
            whose header declares more is refused unread; otherwise it is read as a stream of
            at most ``max_bytes + 1`` bytes whatever its header says, so a member that unpacks
            to more than it declares (a zip bomb) costs at most that much memory. (A zip
            member holding more than its header declares stops at the declared size and
            fails zipfile's CRC check: ``zipfile.BadZipFile``.)

    Raises:
        FileNotFoundError: no regular-file member ``name``.
        TooLargeError: (a ValueError) the member holds more than ``max_bytes``; the message
            names the archive and the member.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")

    def read(a: _OpenTar | _OpenZip) -> bytes:
        if max_bytes is None:
            return a.read(name)
        declared = a.size(name)
        if declared > max_bytes:
            raise TooLargeError(f"{archive}: member {name!r} declares {declared:,} bytes, more "
                                f"than the limit of {max_bytes:,}; not read")
        data = a.read(name, max_bytes + 1)
        if len(data) > max_bytes:
            raise TooLargeError(f"{archive}: member {name!r} holds more than the limit of "
                                f"{max_bytes:,} bytes although its header declares "
                                f"{declared:,}; not read further")
        return data

    try:
        return ARCHIVES.use(str(archive), read)
    except KeyError:
        raise FileNotFoundError(f"{archive}: no regular-file member {name!r}; the archive "
                                "changed since it was listed: re-run the stage that listed it"
                                ) from None
