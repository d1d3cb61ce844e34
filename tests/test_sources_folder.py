"""The ``folder`` pretraining source (your own photos): enumeration, identities (first-level
sub-folder or identities.csv), verification, the download stage's manual step (exit 2) and the
shards stage reading it."""
from __future__ import annotations

import io
import json
import logging
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline import sources
from pipeline.sources import ManualStepRequired, iter_items, read_item


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or path.name.encode())
    return path


def jpeg(colour=(200, 80, 40), size=(40, 40), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def photo_tree(root: Path) -> None:
    write(root / "top.jpg")
    write(root / "alice" / "001.jpg")
    write(root / "alice" / "2019" / "002.png")
    write(root / "bob" / "x.gif")
    write(root / "notes.txt")
    write(root / ".hidden" / "y.jpg")
    with zipfile.ZipFile(root / "faces.zip", "w") as zf:
        zf.writestr("carol/1.jpg", b"c1")
        zf.writestr("loose.jpg", b"l")
    with zipfile.ZipFile(write(root / "alice" / "part.zip", b"x"), "w") as zf:
        zf.writestr("z.jpg", b"az")


def test_identity_is_the_first_level_subfolder(tmp_path):
    root = tmp_path / "folder"
    photo_tree(root)
    items = list(iter_items("folder", root))
    assert [(i.key, i.identity) for i in items] == [
        ("alice/001.jpg", "alice"),
        ("alice/2019/002.png", "alice"),       # deeper folders count for the first level
        ("alice/part.zip/z.jpg", "alice"),     # an archive counts as extracted where it lies
        ("bob/x.gif", "bob"),
        ("faces.zip/carol/1.jpg", "carol"),
        ("faces.zip/loose.jpg", None),
        ("top.jpg", None),                     # directly in the folder: no identity
    ]
    assert read_item(items[2]) == b"az" and read_item(items[0]) == b"001.jpg"
    m = sources.prepare_source("folder", root)
    assert m["verified"] and m["method"] == "manual" and m["role"] == "pretrain"
    assert {k: m["counts"][k] for k in ("images", "identities", "images_with_identity")} == {
        "images": 7, "identities": 3, "images_with_identity": 5}
    assert "identity_file_rows" not in m["counts"]
    assert json.loads((root / "manifest.json").read_text())["counts"] == m["counts"]


def test_identities_csv_gives_every_identity(tmp_path, caplog):
    root = tmp_path / "folder"
    photo_tree(root)
    # Excel-style: BOM, header, CRLF, backslashes and ./ prefixes; one row names a missing
    # image, one has no identity.
    (root / "identities.csv").write_bytes(
        "\ufeffpath,identity\r\n"
        "./alice\\001.jpg,p1\r\n"
        "top.jpg,p2\r\n"
        "faces.zip/carol/1.jpg,p1\r\n"
        "bob/x.gif,\r\n"
        "gone/missing.jpg,p9\r\n".encode("utf-8"))
    assert [(i.key, i.identity) for i in iter_items("folder", root)] == [
        ("alice/001.jpg", "p1"), ("alice/2019/002.png", None), ("alice/part.zip/z.jpg", None),
        ("bob/x.gif", None), ("faces.zip/carol/1.jpg", "p1"), ("faces.zip/loose.jpg", None),
        ("top.jpg", "p2")]
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        m = sources.prepare_source("folder", root)
    assert {k: m["counts"][k] for k in ("images", "identities", "images_with_identity",
                                        "identity_file_rows", "identity_file_missing_images")
            } == {"images": 7, "identities": 2, "images_with_identity": 3,
                  "identity_file_rows": 5, "identity_file_missing_images": 1}
    assert "gone/missing.jpg" in caplog.text

    # Without a header row, the first two columns are path and identity.
    (root / "identities.csv").write_text("top.jpg,p7\n")
    assert [i.identity for i in iter_items("folder", root) if i.key == "top.jpg"] == ["p7"]


@pytest.mark.parametrize("text,match", [
    ("path,identity\ntop.jpg\n", r"line 2: expected '<path>,<identity>'"),
    ("top.jpg,a\ntop.jpg,b\n", r"line 2: top.jpg has identity 'b' here but 'a'"),
    ("../outside.jpg,a\n", r"line 1: path '\.\./outside\.jpg' is not a path relative"),
    ("path,identity\n", r"has no '<path>,<identity>' rows"),
])
def test_malformed_identities_csv_stops_naming_the_line(tmp_path, text, match):
    root = tmp_path / "folder"
    photo_tree(root)
    (root / "identities.csv").write_text(text)
    with pytest.raises(ManualStepRequired, match=match) as e:
        sources.prepare_source("folder", root)
    assert "identities.csv" in str(e.value) and not (root / "manifest.json").exists()


def test_one_wrapper_folder_is_warned_about(tmp_path, caplog):
    root = tmp_path / "folder"
    write(root / "photos" / "alice" / "1.jpg")
    write(root / "photos" / "bob" / "2.jpg")
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        m = sources.prepare_source("folder", root)
    assert m["counts"]["identities"] == 1
    assert "one identity, 'photos'" in caplog.text


def _stage_params(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"download": {"sources": ["folder"],
                                              "au_datasets": ["synthetic"],
                                              "fer_datasets": []},
                                 "finetune_fer": {"datasets": []},
                                 "shards": {"image_size": 32, "workers": 1,
                                            "samples_per_shard": 4}}))
    return p


@pytest.fixture
def stage_env(monkeypatch, tmp_path):
    """The stages without MLflow (a non-zero rank logs nothing) and a stand-in synthetic
    generator (the AU dataset must be named; only the folder source is tested)."""
    from stages import download as download_stage

    def generate(root, cfg):
        root = Path(root)
        write(root / "pool" / "img_0.jpg")
        for fr in (1, 2):
            write(root / "au" / "F001" / "T1" / f"{fr}.jpg")
        (root / "au" / "AUCoding" / "AU_OCC").mkdir(parents=True, exist_ok=True)
        (root / "au" / "AUCoding" / "AU_OCC" / "F001_T1.csv").write_text("0,1\n1,0\n2,1\n")

    monkeypatch.setitem(sys.modules, "pipeline.synthetic",
                        types.SimpleNamespace(generate=generate))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(download_stage, "setup_logging", lambda: None)
    return download_stage


def test_download_stage_stops_with_placement_instructions(stage_env, tmp_path, caplog):
    out = tmp_path / "download"
    argv = ["--params", str(_stage_params(tmp_path)), "--out", str(out)]
    with caplog.at_level(logging.ERROR):
        assert stage_env.main(argv) == 2
    root = out / "folder"
    msg = caplog.text
    assert root.is_dir()  # created, to show where the photos go
    assert f"Place in {root}/" in msg and f"ln -s /absolute/path/to/photos {root}" in msg
    assert f"rmdir {root}" in msg and "identities.csv" in msg
    assert "python -m stages.download" in msg

    # Linked in as the message says (the folder replaced by a link to the photos).
    photos = tmp_path / "my_photos"
    photo_tree(photos)
    root.rmdir()
    root.symlink_to(photos)
    caplog.clear()
    assert stage_env.main(argv) == 0
    assert json.loads((root / "manifest.json").read_text())["counts"]["images"] == 7


def test_shards_stage_reads_the_folder_source(stage_env, tmp_path, monkeypatch):
    from stages import shards as shards_stage
    monkeypatch.setattr(shards_stage, "setup_logging", lambda: None)
    params = str(_stage_params(tmp_path))
    root = tmp_path / "download" / "folder"
    write(root / "alice" / "1.jpg", jpeg())
    write(root / "alice" / "2.gif", jpeg((10, 200, 10), fmt="GIF"))
    write(root / "top.png", jpeg((0, 0, 255), fmt="PNG"))
    with zipfile.ZipFile(root / "bob.zip", "w") as zf:
        zf.writestr("bob/1.jpg", jpeg((90, 90, 90)))
    assert stage_env.main(["--params", params, "--out", str(tmp_path / "download")]) == 0
    shards_stage.main(["--params", params, "--download", str(tmp_path / "download"),
                       "--out", str(tmp_path / "shards"), "--no-progress"])
    stats = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert stats["sources"]["folder"] == {"seen": 4, "kept": 4, "dropped_aspect": 0,
                                          "failed": 0, "gif_first_frame": 1}
    metas = []
    for tar in sorted((tmp_path / "shards").glob("face-*.tar")):
        with tarfile.open(tar) as tf:
            metas += [json.load(tf.extractfile(m)) for m in tf if m.name.endswith(".json")]
    assert [(m["source"], m["key"], m["identity"]) for m in metas] == [
        ("folder", "alice/1.jpg", "alice"), ("folder", "alice/2.gif", "alice"),
        ("folder", "bob.zip/bob/1.jpg", "bob"), ("folder", "top.png", None)]
