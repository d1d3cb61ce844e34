"""pipeline/download.py against a real local HTTP server, and archive safety.

The server (http.server on 127.0.0.1, port 0) serves bytes the test makes and can honour or
ignore Range, fail the first N requests with 500, drop the connection mid-body, or serve
wrong bytes. It records every request's path and Range header.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import random
import re
import struct
import tarfile
import threading
import tracemalloc
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import sources
from pipeline.download import (ChecksumError, DownloadError, TooLargeError, UnsafeArchiveError,
                               fetch, iter_archive_members, read_member, safe_extract)

DATA = random.Random(0).randbytes(300_000)
FAST = dict(backoff=0.0, timeout=5.0, chunk_size=16_384)


@dataclasses.dataclass
class ServerState:
    files: dict[str, bytes]
    honour_range: bool = True
    fails_left: int = 0      # answer 500 to this many requests
    drops_left: int = 0      # send half the body, then close the connection
    wrong: bool = False      # serve other bytes of the same length
    requests: list = dataclasses.field(default_factory=list)  # (path, Range header)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        st: ServerState = self.server.state
        rng = self.headers.get("Range")
        st.requests.append((self.path, rng))
        if st.fails_left > 0:
            st.fails_left -= 1
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = st.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if st.wrong:
            data = bytes(b ^ 0xFF for b in data)
        start, status = 0, 200
        if rng and st.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if st.drops_left > 0:
            st.drops_left -= 1
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.state = ServerState(files={"/data.bin": DATA})
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv.state, base
    srv.shutdown()
    srv.server_close()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------- fetch
def test_plain_download_verifies_both_checksums(server, tmp_path):
    st, base = server
    dest = tmp_path / "d" / "data.bin"
    out = fetch(f"{base}/data.bin", dest, sha256=sha(DATA), md5=hashlib.md5(DATA).hexdigest(),
                size=len(DATA), **FAST)
    assert out == dest and dest.read_bytes() == DATA
    assert not dest.with_name("data.bin.part").exists()
    assert st.requests == [("/data.bin", None)]


def test_verified_file_is_not_downloaded_again(server, tmp_path):
    st, base = server
    dest = tmp_path / "data.bin"
    dest.write_bytes(DATA)
    fetch(f"{base}/data.bin", dest, sha256=sha(DATA), **FAST)
    assert st.requests == []


def test_existing_file_with_wrong_checksum_is_replaced(server, tmp_path):
    st, base = server
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"old and broken")
    fetch(f"{base}/data.bin", dest, sha256=sha(DATA), **FAST)
    assert dest.read_bytes() == DATA
    assert (tmp_path / "data.bin.bad").read_bytes() == b"old and broken"
    assert len(st.requests) == 1


@pytest.mark.parametrize("honour_range", [True, False])
def test_resume_of_partial_file(server, tmp_path, honour_range):
    st, base = server
    st.honour_range = honour_range
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(DATA[:100_000])
    fetch(f"{base}/data.bin", dest, sha256=sha(DATA), **FAST)
    assert dest.read_bytes() == DATA
    assert st.requests == [("/data.bin", "bytes=100000-")]


def test_retries_after_server_errors(server, tmp_path):
    st, base = server
    st.fails_left = 2
    dest = tmp_path / "data.bin"
    fetch(f"{base}/data.bin", dest, sha256=sha(DATA), retries=2, **FAST)
    assert dest.read_bytes() == DATA
    assert len(st.requests) == 3


def test_connection_dropped_mid_body_resumes_with_range(server, tmp_path):
    st, base = server
    st.drops_left = 2
    dest = tmp_path / "data.bin"
    fetch(f"{base}/data.bin", dest, sha256=sha(DATA), retries=1, **FAST)
    assert dest.read_bytes() == DATA
    half = len(DATA) // 2
    quarter = half + (len(DATA) - half) // 2
    # Each attempt that brought new data resets the retry count (retries=1 survives 2 drops).
    assert st.requests == [("/data.bin", None), ("/data.bin", f"bytes={half}-"),
                           ("/data.bin", f"bytes={quarter}-")]


def test_retries_exhausted_raises_clear_error(server, tmp_path):
    st, base = server
    st.fails_left = 100
    dest = tmp_path / "data.bin"
    url = f"{base}/data.bin"
    with pytest.raises(DownloadError, match="3 attempt") as e:
        fetch(url, dest, sha256=sha(DATA), retries=2, **FAST)
    assert url in str(e.value) and "HTTP 500" in str(e.value)
    assert len(st.requests) == 3
    assert not dest.exists()


def test_client_errors_are_not_retried(server, tmp_path):
    st, base = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{base}/missing.bin", tmp_path / "m.bin", retries=5, **FAST)
    assert len(st.requests) == 1


def test_checksum_mismatch_keeps_bad_file_out_of_the_way(server, tmp_path):
    st, base = server
    st.wrong = True
    dest = tmp_path / "data.bin"
    url = f"{base}/data.bin"
    with pytest.raises(ChecksumError) as e:
        fetch(url, dest, sha256=sha(DATA), **FAST)
    msg = str(e.value)
    got = sha(bytes(b ^ 0xFF for b in DATA))
    assert url in msg and str(dest) in msg and sha(DATA) in msg and got in msg
    assert not dest.exists() and not (tmp_path / "data.bin.part").exists()
    assert (tmp_path / "data.bin.bad").stat().st_size == len(DATA)


def _named_part_files_exist(msg: str) -> None:
    for name in re.findall(r"\S+\.part\b", msg):
        assert Path(name).exists(), f"the message names {name}, which does not exist: {msg}"


def test_failed_download_names_the_part_file_only_when_it_exists(server, tmp_path):
    st, base = server
    st.fails_left = 100
    dest = tmp_path / "x.zip"
    with pytest.raises(DownloadError) as e:
        fetch(f"{base}/data.bin", dest, retries=1, **FAST)
    assert ".part" not in str(e.value) and "nothing was received" in str(e.value)
    assert not dest.with_name("x.zip.part").exists()
    st.fails_left, st.drops_left = 0, 100  # half the body each time: a .part is kept
    with pytest.raises(DownloadError) as e:
        fetch(f"{base}/data.bin", dest, retries=0, **FAST)
    assert str(dest.with_name("x.zip.part")) in str(e.value)
    _named_part_files_exist(str(e.value))


def test_wrong_size_from_server_fails_fast(server, tmp_path):
    st, base = server
    with pytest.raises(DownloadError, match=f"{len(DATA)} bytes but 10 are expected"):
        fetch(f"{base}/data.bin", tmp_path / "x.bin", size=10, **FAST)
    assert len(st.requests) == 1


# --------------------------------------------------------------------------- CelebA via prepare
def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _local_celeba(monkeypatch, base: str, zip_data: bytes, ids: bytes) -> None:
    spec = sources.SOURCES["celeba"]
    zip_spec, ids_spec = spec.files  # the registry's entries, with local URLs and checksums
    files = (dataclasses.replace(zip_spec, md5=hashlib.md5(zip_data).hexdigest(),
                                 url=f"{base}/img_align_celeba.zip"),
             dataclasses.replace(ids_spec, md5=hashlib.md5(ids).hexdigest(),
                                 url=f"{base}/identity_CelebA.txt"))
    assert zip_spec.filename == "img_align_celeba.zip" and not ids_spec.required
    monkeypatch.setitem(sources.SOURCES, "celeba", dataclasses.replace(spec, files=files))


def test_prepare_celeba_downloads_verifies_and_enumerates(server, tmp_path, monkeypatch):
    st, base = server
    zip_data = _zip_bytes({"img_align_celeba/000001.jpg": b"a",
                           "img_align_celeba/000002.jpg": b"b"})
    ids = b"000001.jpg 2880\n000002.jpg 17\n"
    st.files.update({"/img_align_celeba.zip": zip_data, "/identity_CelebA.txt": ids})
    _local_celeba(monkeypatch, base, zip_data, ids)
    root = tmp_path / "celeba"
    m = sources.prepare_source("celeba", root, retries=1, timeout=5, backoff=0)
    assert m["verified"] and m["counts"]["images"] == 2 and m["counts"]["identities"] == 2
    assert (root / "manifest.json").is_file()
    items = list(sources.iter_items("celeba", root))
    assert [(i.identity, sources.read_item(i)) for i in items] == [("2880", b"a"), ("17", b"b")]
    n = len(st.requests)
    sources.prepare_source("celeba", root, retries=1, timeout=5, backoff=0)
    assert len(st.requests) == n  # complete, verified files are not fetched again


def test_prepare_celeba_web_page_instead_of_file_asks_for_manual_step(server, tmp_path,
                                                                      monkeypatch):
    st, base = server
    zip_data = _zip_bytes({"img_align_celeba/000001.jpg": b"a"})
    st.files.update({"/img_align_celeba.zip": b"<!DOCTYPE html><html>Quota exceeded</html>",
                     "/identity_CelebA.txt": b"000001.jpg 1\n"})
    _local_celeba(monkeypatch, base, zip_data, b"000001.jpg 1\n")
    root = tmp_path / "celeba"
    with pytest.raises(sources.ManualStepRequired) as e:
        sources.prepare_source("celeba", root, retries=0, timeout=5, backoff=0)
    msg = str(e.value)
    assert "web page" in msg and str(root) in msg and "img_align_celeba.zip" in msg
    assert not (root / "img_align_celeba.zip").exists()
    assert not (root / "manifest.json").exists()


def test_placed_celeba_files_skip_the_network(server, tmp_path, monkeypatch):
    """The official zip is placed, the optional identity file is not: no request at all (a
    cloud drive used to be retried for minutes before)."""
    st, base = server
    zip_data = _zip_bytes({"img_align_celeba/000001.jpg": b"a"})
    st.fails_left = 1000  # every request would fail, slowly with retries
    _local_celeba(monkeypatch, base, zip_data, b"000001.jpg 1\n")
    root = tmp_path / "celeba"
    write_to = root / "img_align_celeba.zip"
    write_to.parent.mkdir()
    write_to.write_bytes(zip_data)
    m = sources.prepare_source("celeba", root, retries=3, timeout=5, backoff=0)
    assert st.requests == []
    assert m["counts"]["images"] == 1 and m["counts"]["identities"] == 0

    # A placed zip that does not verify is reported, not renamed and fetched again.
    write_to.write_bytes(_zip_bytes({"img_align_celeba/000001.jpg": b"other"}))
    with pytest.raises(sources.ManualStepRequired, match="published checksum"):
        sources.prepare_source("celeba", root, retries=3, timeout=5, backoff=0)
    assert st.requests == [] and write_to.exists()
    assert not write_to.with_name("img_align_celeba.zip.bad").exists()


def test_user_identity_file_is_used_when_well_formed(server, tmp_path, monkeypatch, caplog):
    st, base = server
    zip_data = _zip_bytes({"img_align_celeba/000001.jpg": b"a",
                           "img_align_celeba/000002.jpg": b"b"})
    official = b"000001.jpg 2880\n000002.jpg 17\n"
    st.files.update({"/img_align_celeba.zip": zip_data, "/identity_CelebA.txt": official})
    _local_celeba(monkeypatch, base, zip_data, official)
    root = tmp_path / "celeba"
    root.mkdir()
    ids = root / "identity_CelebA.txt"
    ids.write_text("000001.jpg 7\n\n000002.jpg 8\n000003.jpg 9\n")  # not the official file
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        m = sources.prepare_source("celeba", root, retries=0, timeout=5, backoff=0)
    # The zip was missing and was downloaded; the user's identity file was kept and used.
    assert [r[0] for r in st.requests] == ["/img_align_celeba.zip"]
    assert ids.read_text().startswith("000001.jpg 7") and "not the official file" in caplog.text
    assert [(i.identity, sources.read_item(i)) for i in sources.iter_items("celeba", root)] == [
        ("7", b"a"), ("8", b"b")]
    c = m["counts"]
    assert (c["images"], c["identities"], c["identity_file_rows"],
            c["identity_file_missing_images"]) == (2, 2, 3, 1)
    entry = next(f for f in m["files"] if f["path"] == "identity_CelebA.txt")
    assert entry["checksum_verified"] is False and "not the official" in entry["note"]

    for bad, match in [("000001.jpg 7 extra\n", "line 1: expected '<image name> <identity>'"),
                       ("202599\n", "line 1: expected"),
                       ("000001.jpg 7\nAnno.txt 3\n", "line 2: 'Anno.txt' is not an image"),
                       ("000001.jpg 7\n000001.jpg 8\n", "line 2: 000001.jpg has identity 8")]:
        ids.write_text(bad)
        with pytest.raises(sources.ManualStepRequired, match=match) as e:
            sources.prepare_source("celeba", root, retries=0, timeout=5, backoff=0)
        msg = str(e.value)
        assert "download it again" not in msg and ".part" not in msg
    assert len(st.requests) == 1


def test_celeba_download_failure_names_no_missing_part_file(server, tmp_path, monkeypatch):
    st, base = server
    st.fails_left = 1000
    _local_celeba(monkeypatch, base, b"zip", b"ids")
    root = tmp_path / "celeba"
    with pytest.raises(sources.ManualStepRequired) as e:
        sources.prepare_source("celeba", root, retries=1, timeout=5, backoff=0)
    assert "img_align_celeba.zip" in str(e.value)
    _named_part_files_exist(str(e.value))


# --------------------------------------------------------------------------- archives
def _zip_with(tmp_path: Path, bad: str) -> Path:
    path = tmp_path / "arch" / f"{bad}.zip"
    path.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok/first.txt", b"fine")
        if bad == "absolute":
            zf.writestr(zipfile.ZipInfo(f"{tmp_path}/evil_abs.txt"), b"x")
        elif bad == "dotdot":
            zf.writestr("ok/../../evil.txt", b"x")
        elif bad == "symlink":
            info = zipfile.ZipInfo("ok/link")
            info.external_attr = (0o120777 << 16)  # S_IFLNK | 0777
            zf.writestr(info, b"../../evil.txt")
    return path


def _tar_with(tmp_path: Path, bad: str, mode: str = "w") -> Path:
    path = tmp_path / "arch" / f"{bad}.tar"
    path.parent.mkdir(exist_ok=True)
    with tarfile.open(path, mode) as tf:
        ok = tarfile.TarInfo("ok/first.txt")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        ti = tarfile.TarInfo({"absolute": f"{tmp_path}/evil_abs.txt", "dotdot": "ok/../../evil.txt",
                              "device": "ok/dev"}.get(bad, "ok/link"))
        if bad in ("absolute", "dotdot"):
            ti.size = 1
            tf.addfile(ti, io.BytesIO(b"x"))
            return path
        if bad == "symlink":
            ti.type, ti.linkname = tarfile.SYMTYPE, "first.txt"  # even inside: refused
        elif bad == "hardlink":
            ti.type, ti.linkname = tarfile.LNKTYPE, "ok/first.txt"
        elif bad == "device":
            ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
        tf.addfile(ti)
    return path


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("fmt,bad", [("zip", "absolute"), ("zip", "dotdot"), ("zip", "symlink"),
                                     ("tar", "absolute"), ("tar", "dotdot"), ("tar", "symlink"),
                                     ("tar", "hardlink"), ("tar", "device")])
def test_safe_extract_refuses_unsafe_members(tmp_path, fmt, bad):
    archive = (_zip_with if fmt == "zip" else _tar_with)(tmp_path, bad)
    before = _all_files(tmp_path)
    target = tmp_path / "out" / "target"
    with pytest.raises(UnsafeArchiveError, match="nothing was written") as e:
        safe_extract(archive, target)
    assert str(archive) in str(e.value)
    assert _all_files(tmp_path) == before  # not even the harmless first member


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_safe_extract_and_in_place_reading_of_a_safe_archive(tmp_path, fmt):
    members = {"a/1.jpg": b"one", "a/b/2.png": b"two", "top.txt": b"three"}
    path = tmp_path / f"good.{fmt}"
    if fmt == "zip":
        path.write_bytes(_zip_bytes(members))
    else:
        with tarfile.open(path, "w:gz" if fmt == "tar.gz" else "w") as tf:
            for name, data in members.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    assert [(m.name, m.size) for m in iter_archive_members(path)] == \
        [(n, len(d)) for n, d in members.items()]
    assert read_member(path, "a/b/2.png") == b"two"
    with pytest.raises(FileNotFoundError, match="no regular-file member"):
        read_member(path, "nope.jpg")
    written = safe_extract(path, tmp_path / "x")
    assert {p.relative_to(tmp_path / "x").as_posix(): p.read_bytes() for p in written} == members


# --------------------------------------------------------------------------- read limits
BOMB = 64 << 20  # bytes of zeros in one member: compresses to ~64 KB


def _bomb_zip(path: Path, declared: int | None = None) -> Path:
    """A zip with ``ok.jpg`` (10 bytes) and ``bomb.jpg`` (BOMB zeros, deflated); ``declared``
    rewrites bomb.jpg's uncompressed size in its local and central headers (a lying header)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.jpg", b"0123456789")
        with zf.open("bomb.jpg", "w") as f:
            for _ in range(BOMB >> 20):
                f.write(bytes(1 << 20))
    if declared is not None:
        data = bytearray(path.read_bytes())
        name = b"bomb.jpg"
        lh = data.index(b"PK\x03\x04", data.index(b"PK\x03\x04") + 4)  # 2nd: bomb.jpg
        assert data[lh + 30:lh + 30 + len(name)] == name
        struct.pack_into("<I", data, lh + 22, declared)
        cd = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)
        assert data[cd + 46:cd + 46 + len(name)] == name
        struct.pack_into("<I", data, cd + 24, declared)
        path.write_bytes(bytes(data))
    return path


def _peak(fn):
    tracemalloc.start()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned for the caller to check
        err = e
    else:
        err = None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, err


def test_read_member_max_bytes_refuses_a_declared_bomb_unread(tmp_path):
    path = _bomb_zip(tmp_path / "faces.zip")
    assert read_member(path, "ok.jpg", max_bytes=10) == b"0123456789"
    with pytest.raises(TooLargeError):
        read_member(path, "ok.jpg", max_bytes=9)
    peak, err = _peak(lambda: read_member(path, "bomb.jpg", max_bytes=1 << 20))
    assert isinstance(err, TooLargeError) and isinstance(err, ValueError)
    assert str(path) in str(err) and "'bomb.jpg'" in str(err)
    assert peak < 4 << 20


def test_read_member_max_bytes_streams_a_member_with_a_lying_header(tmp_path):
    """bomb.jpg declares 1,000 bytes but inflates to 64 MiB: at most max_bytes + 1 bytes are
    inflated (ZipFile.read would inflate all of it first); the CRC check then fails."""
    path = _bomb_zip(tmp_path / "faces.zip", declared=1000)
    peak, err = _peak(lambda: read_member(path, "bomb.jpg", max_bytes=1 << 20))
    assert isinstance(err, zipfile.BadZipFile), err
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB held while reading"


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_read_member_max_bytes_in_tars(tmp_path, mode):
    path = tmp_path / ("t.tar.gz" if mode == "w:gz" else "t.tar")
    with tarfile.open(path, mode) as tf:
        for name, size in [("a/ok.jpg", 100), ("a/big.jpg", 3 << 20)]:
            ti = tarfile.TarInfo(name)
            ti.size = size
            tf.addfile(ti, io.BytesIO(bytes(size)))
    assert read_member(path, "a/ok.jpg", max_bytes=100) == bytes(100)
    peak, err = _peak(lambda: read_member(path, "a/big.jpg", max_bytes=1 << 20))
    assert isinstance(err, TooLargeError) and str(path) in str(err) and "a/big.jpg" in str(err)
    assert peak < 2 << 20
    assert len(read_member(path, "a/big.jpg")) == 3 << 20  # no limit: as before
    with pytest.raises(FileNotFoundError, match="no regular-file member"):
        read_member(path, "nope.jpg", max_bytes=10)
