"""Atomic writes (pipeline/io.py): a full disk names the folder; killed runs' temporaries go."""
from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

from pipeline.io import (atomic_path, atomic_torch_save, atomic_write_bytes, atomic_write_json,
                         remove_stale_temporaries)
from pipeline.models.mae import save_checkpoint

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"),
                                    reason="needs /dev/full (Linux) for a real ENOSPC")


def _temporary(folder: Path, name: str, suffix: str = "") -> Path:
    """A temporary named exactly as atomic_path names it, as a killed run leaves it."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}.", suffix=suffix, dir=folder)
    os.write(fd, b"x" * 1000)
    os.close(fd)
    return Path(tmp)


# --------------------------------------------------------------------------- full disk
@needs_dev_full
def test_a_full_disk_inside_an_atomic_write_names_the_folder(tmp_path):
    out = tmp_path / "outputs" / "predictions.parquet"
    with pytest.raises(OSError, match=r"predictions\.parquet: cannot write it.*Free space in "
                                      + re.escape(str(out.parent))) as info:
        with atomic_path(out):
            with open("/dev/full", "wb") as f:  # the kernel answers ENOSPC
                f.write(b"x" * 100_000)
                f.flush()
    assert info.value.errno == errno.ENOSPC  # callers can still test the errno
    assert list(out.parent.iterdir()) == []  # no output, no temporary


@needs_dev_full
@pytest.mark.parametrize("writer", [
    lambda p: atomic_write_bytes(p, b"x" * 100_000),
    lambda p: atomic_write_json(p, {"a": "x" * 100_000}),
    lambda p: atomic_torch_save(p, {"w": torch.zeros(100_000)}),
    lambda p: save_checkpoint(p, {"w": torch.zeros(100_000)}, {"img_size": 32}, epoch=1),
], ids=["bytes", "json", "torch_save", "save_checkpoint"])
def test_every_atomic_writer_explains_a_full_disk(tmp_path, monkeypatch, writer):
    # The temporary is a link to /dev/full: every byte written to it fails with a real
    # ENOSPC, wherever in the writer (torch.save, write, flush or fsync) it surfaces.
    def mkstemp_on_full_disk(prefix="", suffix="", dir=None):
        link = Path(dir) / f"{prefix}full0000{suffix}"
        link.symlink_to("/dev/full")
        return os.open(link, os.O_WRONLY), str(link)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_on_full_disk)
    out = tmp_path / "state" / "last.pt"
    with pytest.raises(OSError, match=r"last\.pt: cannot write it, No space left on device"
                                      r".*Free space in " + re.escape(str(out.parent))) as info:
        writer(out)
    assert info.value.errno == errno.ENOSPC
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "a.json"):
            raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(tmp_path / "a.json"):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- temporaries
def test_stale_temporaries_are_removed_and_nothing_else(tmp_path, caplog):
    stale = [_temporary(tmp_path, "last.pt"), _temporary(tmp_path, "metrics.json"),
             _temporary(tmp_path, "recon.png", suffix=".png")]  # save_figure's suffix
    (tmp_path / "backbones").mkdir()
    deep = _temporary(tmp_path / "backbones", "epoch_001.pt")
    keep = {name: tmp_path / name for name in (
        "last.pt", "notes.txt", ".tmp-notes", ".tmp-last.pt", "tmp-last.pt.abcd1234",
        ".tmp-last.pt.ABCD1234", ".tmp-last.pt.abc", "x.tmp-last.pt.abcd1234")}
    for p in keep.values():
        p.write_text("mine")
    (tmp_path / ".tmp-dir.abcd1234").mkdir()  # a folder with a matching name: not ours
    (tmp_path / ".tmp-link.abcd1234").symlink_to(tmp_path / "notes.txt")

    with caplog.at_level(logging.INFO, logger="pipeline"):
        removed = remove_stale_temporaries(tmp_path)
    assert removed == sorted(stale)
    assert deep.exists()  # not recursive by default
    assert all(p.read_text() == "mine" for p in keep.values())
    assert (tmp_path / ".tmp-dir.abcd1234").is_dir()
    assert (tmp_path / ".tmp-link.abcd1234").is_symlink()
    assert "2.9 KiB freed" in caplog.text and stale[0].name in caplog.text

    assert remove_stale_temporaries(tmp_path, recursive=True) == [deep]
    assert remove_stale_temporaries(tmp_path, recursive=True) == []
    assert remove_stale_temporaries(tmp_path / "missing") == []
