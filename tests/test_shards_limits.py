"""Tests of pipeline/shards.py's size limit: a file or zip/tar member larger than one encoded
image can be is refused by name before it is read, counted as failed, and the stage goes on;
a zip member whose header under-declares its data is refused without reading past the header."""
from __future__ import annotations

import io
import logging
import struct
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import shards
from pipeline.params import ShardsParams
from pipeline.shards import build_shards, declared_size
from pipeline.sources import Item, read_item

LIMIT = 64 << 10     # a small MAX_ENCODED_BYTES, so the test files stay small
SOURCE = "src"


@pytest.fixture(autouse=True)
def small_limit(monkeypatch):
    monkeypatch.setattr(shards, "MAX_ENCODED_BYTES", LIMIT)


def cfg(**kw) -> ShardsParams:
    base = dict(image_size=32, samples_per_shard=4, workers=1, jpeg_quality=90)
    base.update(kw)
    return ShardsParams(**base)


def jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def black_bmp(side: int = 1672) -> bytes:
    """A valid, uncompressed image of about 8 MB (side**2 * 3), highly compressible."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "BMP")
    return buf.getvalue()


# big.jpg is a real image (named .jpg, as in the incident): without the limit it is kept.
MEMBERS = {"a.jpg": jpeg(0), "big.jpg": black_bmp(), "c.jpg": jpeg(1)}
BIG = len(MEMBERS["big.jpg"])


def make_archive(tmp: Path, kind: str) -> Path:
    """``a.jpg``, ``big.jpg`` (BIG bytes, over LIMIT), ``c.jpg`` in a zip or a tar.gz."""
    if kind == "zip":
        path = tmp / "faces.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in MEMBERS.items():
                zf.writestr(name, data)
    else:
        path = tmp / "faces.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            for name, data in MEMBERS.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    assert path.stat().st_size < 100_000  # the test file is small; its member is not
    return path


def member_items(path: Path) -> list[Item]:
    return [Item(SOURCE, f"{path.name}/{m}", str(path), m, None) for m in MEMBERS]


class RecordingReader:
    """``pipeline.sources.read_item`` that records which items it was asked for."""

    def __init__(self):
        self.keys: list[str] = []

    def __call__(self, item) -> bytes:
        self.keys.append(item.key)
        return read_item(item)


def build_traced(items, read, out: Path) -> tuple[dict, int]:
    """build_shards on one worker; returns (stats, peak bytes allocated by Python meanwhile)."""
    tracemalloc.start()
    try:
        stats = build_shards(items, read, out, cfg(), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return stats, peak


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_oversized_member_refused_by_header_unread(tmp_path, kind, caplog):
    path = make_archive(tmp_path, kind)
    items = member_items(path)
    assert declared_size(items[1]) == BIG and declared_size(items[0]) == len(MEMBERS["a.jpg"])
    read = RecordingReader()
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        stats, peak = build_traced(items, read, tmp_path / "out")
    assert stats["total"] == {"seen": 3, "kept": 2, "dropped_aspect": 0, "failed": 1,
                              "gif_first_frame": 0}
    assert read.keys == [f"{path.name}/a.jpg", f"{path.name}/c.jpg"]  # big.jpg never read
    assert peak < BIG // 4  # reading it whole would allocate BIG bytes at least
    assert f"{SOURCE}/{path.name}/big.jpg (too large)" in caplog.text
    assert f"declares {BIG:,} bytes" in caplog.text and "MAX_ENCODED_BYTES" in caplog.text
    assert (tmp_path / "out" / "stats.json").is_file()  # the stage went on and finished


def test_oversized_loose_file_refused_unread(tmp_path):
    files = {}
    for name, data in MEMBERS.items():
        (tmp_path / name).write_bytes(data)
        files[name] = Item(SOURCE, name, str(tmp_path / name), None, None)
    read = RecordingReader()
    stats, peak = build_traced(list(files.values()), read, tmp_path / "out")
    assert (stats["total"]["kept"], stats["total"]["failed"]) == (2, 1)
    assert read.keys == ["a.jpg", "c.jpg"] and peak < BIG // 4


def lying_zip(path: Path, declared: int) -> None:
    """A zip whose big.jpg headers (local and central) declare ``declared`` bytes, while its
    deflate stream holds BIG bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in MEMBERS.items():
            zf.writestr(name, data)
    data = bytearray(buf.getvalue())
    local = data.find(b"big.jpg") - 30  # local header: 30 bytes, then the name
    assert data[local:local + 4] == b"PK\x03\x04"
    struct.pack_into("<I", data, local + 22, declared)  # uncompressed size
    central = data.rfind(b"big.jpg") - 46  # central directory entry: 46 bytes, then the name
    assert data[central:central + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, central + 24, declared)
    path.write_bytes(bytes(data))


def test_member_holding_more_than_declared_refused_within_limit(tmp_path, caplog, monkeypatch):
    path = tmp_path / "faces.zip"
    lying_zip(path, declared=1000)
    items = member_items(path)
    assert declared_size(items[1]) == 1000  # under the limit: the header check lets it pass
    requested = []  # (member, bytes asked for) of every read of a zip member
    zip_read = zipfile.ZipExtFile.read

    def recording_read(self, n=-1):
        requested.append((self.name, n))
        return zip_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", recording_read)
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        stats, peak = build_traced(items, read_item, tmp_path / "out")
    assert (stats["total"]["kept"], stats["total"]["failed"]) == (2, 1)
    assert ("big.jpg", LIMIT + 1) in requested
    assert all(0 <= n <= LIMIT + 1 for _, n in requested)  # never "read all it holds"
    assert peak < BIG // 4  # zipfile's whole-member read decompresses all BIG bytes
    assert f"{SOURCE}/faces.zip/big.jpg (corrupt archive member)" in caplog.text
    assert "download it again" in caplog.text


def test_reader_returning_more_than_the_limit_refused(tmp_path, caplog):
    """No header to check (an item without container): the bytes returned are checked."""
    class Bare:
        def __init__(self, key):
            self.source, self.key, self.identity = SOURCE, key, None

    arr = np.random.default_rng(2).integers(0, 255, (200, 200, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # a valid image, but over the limit
    blobs = {"small": jpeg(3), "huge.png": buf.getvalue()}
    assert len(blobs["huge.png"]) > LIMIT
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        stats = build_shards([Bare(k) for k in blobs], lambda it: blobs[it.key],
                             tmp_path / "out", cfg(), progress=False)
    assert (stats["total"]["kept"], stats["total"]["failed"]) == (1, 1)
    assert f"{SOURCE}/huge.png (too large)" in caplog.text


def test_limit_reaches_worker_processes(tmp_path):
    path = make_archive(tmp_path, "zip")
    stats = build_shards(member_items(path) * 3, read_item, tmp_path / "out", cfg(workers=2),
                         progress=False)
    assert (stats["total"]["kept"], stats["total"]["failed"]) == (6, 3)


def test_default_limit_follows_pillow_pixel_limit(monkeypatch):
    monkeypatch.undo()  # the module's own value, not this file's small one
    assert shards.MAX_DECODED_PIXELS == 2 * Image.MAX_IMAGE_PIXELS  # DecompressionBombError
    assert shards.MAX_ENCODED_BYTES == (shards.MAX_DECODED_PIXELS * shards.MAX_BYTES_PER_PIXEL
                                        + shards.ENCODED_SLACK_BYTES)
    assert 500e6 < shards.MAX_ENCODED_BYTES < 1.5 * 2 ** 30  # the 1.5 GiB member is refused
