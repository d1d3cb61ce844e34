"""pipeline/sources.py: registry, in-place enumeration (folder, zip, tar, RecordIO), AU dataset
verification, manual-step messages, and prepare_source for synthetic / manual / LAION-Face."""
from __future__ import annotations

import io
import pickle
import struct
import sys
import tarfile
import textwrap
import types
import zipfile
from pathlib import Path

import pytest

from pipeline import sources
from pipeline.params import AU_DATASETS, FER_DATASETS, PRETRAIN_SOURCES
from pipeline.sources import Item, ManualStepRequired, iter_items, read_item, verify_source

MAGIC = 0xCED7230A


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or path.name.encode())
    return path


# --------------------------------------------------------------------------- registry
def test_registry_covers_exactly_the_params_names():
    assert set(sources.SOURCES) == (set(PRETRAIN_SOURCES) | set(AU_DATASETS)
                                    | set(FER_DATASETS) - {"synthetic"})
    for name, s in sources.SOURCES.items():
        assert s.name == name and s.method in ("synthetic", "download", "img2dataset", "manual")
        assert s.place and s.get and s.licence
        for f in s.files:  # a URL is only listed together with a checksum
            assert f.url is None or f.md5 or f.sha256
    assert sources.SOURCES["celeba"].files[0].md5 == "00d2c5bc6d35e252742224ab0c1e8fcb"
    with pytest.raises(ValueError, match="unknown source 'celebb'"):
        sources.get_source("celebb")


# --------------------------------------------------------------------------- enumeration
def test_folder_per_identity_sorted_and_bookkeeping_skipped(tmp_path):
    root = tmp_path / "vggface2"
    for rel in ["train/n002/b.jpg", "train/n001/z.JPG", "train/n001/a.png", "top.jpg"]:
        write(root / rel)
    for rel in ["notes.txt", "manifest.json", "train/n001/c.jpg.part", ".tmp-x/q.jpg"]:
        write(root / rel)
    items = list(iter_items("vggface2", root))
    assert [(i.key, i.identity, i.member) for i in items] == [
        ("top.jpg", None, None), ("train/n001/a.png", "n001", None),
        ("train/n001/z.JPG", "n001", None), ("train/n002/b.jpg", "n002", None)]
    assert read_item(items[1]) == b"a.png"
    assert pickle.loads(pickle.dumps(items[1])) == items[1]


def test_zip_read_in_place_with_identities(tmp_path):
    root = tmp_path / "casia_webface"
    zpath = root / "faces.zip"
    zpath.parent.mkdir(parents=True)
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("CASIA-WebFace/0000099/001.jpg", b"p99")
        zf.writestr("CASIA-WebFace/0000045/002.jpg", b"p45b")
        zf.writestr("CASIA-WebFace/0000045/001.jpg", b"p45a")
        zf.writestr("CASIA-WebFace/readme.txt", b"not an image")
    items = list(iter_items("casia_webface", root))
    assert [(i.key, i.identity) for i in items] == [
        ("faces.zip/CASIA-WebFace/0000045/001.jpg", "0000045"),
        ("faces.zip/CASIA-WebFace/0000045/002.jpg", "0000045"),
        ("faces.zip/CASIA-WebFace/0000099/001.jpg", "0000099")]
    assert [read_item(i) for i in items] == [b"p45a", b"p45b", b"p99"]
    assert not (root / "CASIA-WebFace").exists()  # nothing was extracted


def test_webdataset_tar_in_archive_order_links_skipped(tmp_path):
    root = tmp_path / "umdfaces"
    tpath = root / "batch1.tar"
    tpath.parent.mkdir(parents=True)
    with tarfile.open(tpath, "w") as tf:
        for name, data in [("./Zoe/2.jpg", b"z2"), ("./Adam/1.jpg", b"a1"),
                           ("./Adam/1.json", b"{}")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("./Adam/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    items = list(iter_items("umdfaces", root))
    assert [(i.key, i.identity, i.member) for i in items] == [
        ("batch1.tar/Zoe/2.jpg", "Zoe", "./Zoe/2.jpg"),
        ("batch1.tar/Adam/1.jpg", "Adam", "./Adam/1.jpg")]
    assert [read_item(i) for i in items] == [b"z2", b"a1"]


def test_celeba_identities_from_identity_file(tmp_path):
    root = tmp_path / "celeba"
    write(root / "img_align_celeba" / "000002.jpg")
    write(root / "img_align_celeba" / "000001.jpg")
    (root / "identity_CelebA.txt").write_text("000001.jpg 2880\n000002.jpg 1\n")
    assert [(i.key, i.identity) for i in iter_items("celeba", root)] == [
        ("img_align_celeba/000001.jpg", "2880"), ("img_align_celeba/000002.jpg", "1")]


def _rec_data(flag: int, labels: list[float], payload: bytes, rec_id: int) -> bytes:
    if flag == 0:
        return struct.pack("<IfQQ", 0, labels[0], rec_id, 0) + payload
    return struct.pack("<IfQQ", flag, 0.0, rec_id, 0) + struct.pack(f"<{flag}f", *labels) + payload


def write_rec(path: Path, records: list[bytes]) -> list[int]:
    """MXNet RecordIO writer: splits a record where its data holds the magic at a 4-byte
    aligned position (dmlc-core's rule), the magic being dropped; pads parts to 4 bytes."""
    magic = struct.pack("<I", MAGIC)
    offsets = []
    with open(path, "wb") as f:
        for data in records:
            offsets.append(f.tell())
            parts, dptr = [], 0
            for i in range(0, len(data) - len(data) % 4, 4):
                if data[i:i + 4] == magic:
                    parts.append(data[dptr:i])
                    dptr = i + 4
            parts.append(data[dptr:])
            for k, part in enumerate(parts):
                cflag = 0 if len(parts) == 1 else 1 if k == 0 else 3 if k == len(parts) - 1 else 2
                f.write(struct.pack("<II", MAGIC, (cflag << 29) | len(part)))
                f.write(part + b"\0" * (-len(part) % 4))
    with open(path.with_suffix(".idx"), "w") as f:
        f.writelines(f"{i}\t{o}\n" for i, o in enumerate(offsets))
    return offsets


def test_recordio_enumeration_with_split_records_and_labels(tmp_path):
    root = tmp_path / "megaface"
    (root / "faces_112x112").mkdir(parents=True)
    magic = struct.pack("<I", MAGIC)
    split_payload = b"JPEG" + magic + b"middle.." + magic + b"end"  # 2 aligned magics
    records = [
        _rec_data(2, [1.0, 5.0], b"", 0),              # InsightFace header record: skipped
        _rec_data(0, [0.0], b"img-a", 1),
        _rec_data(0, [0.0], split_payload, 2),
        _rec_data(1, [7.0], b"img-c", 3),              # label array: first label = identity
        _rec_data(0, [5.0], b"img-d", MAGIC),          # magic inside the header itself
        _rec_data(2, [1.0, 3.0], b"", 5),              # identity-range record: skipped
    ]
    rec = root / "faces_112x112" / "train.rec"
    offsets = write_rec(rec, records)
    assert rec.read_bytes().count(magic) > len(records)  # the splits really happened
    items = list(iter_items("megaface", root))
    assert [(i.key, i.identity, i.member) for i in items] == [
        (f"faces_112x112/train.rec@{o}", ident, str(o))
        for o, ident in zip(offsets[1:5], ["0", "0", "7", "5"])]
    assert [read_item(i) for i in items] == [b"img-a", split_payload, b"img-c", b"img-d"]

    rec.write_bytes(rec.read_bytes()[:-3])  # a truncated copy fails loudly, naming the file
    with pytest.raises(sources.RecordIOError, match="truncated"):
        list(iter_items("megaface", root))


def test_synthetic_enumerates_pool_with_identity_csv(tmp_path):
    root = tmp_path / "synthetic"
    for name in ["img_000001.jpg", "img_000000.jpg", "broken_000.jpg"]:
        write(root / "pool" / name)
    (root / "pool" / "identities.csv").write_text(
        "file,identity\nimg_000000.jpg,s03\nimg_000001.jpg,s07\n")
    write(root / "au" / "S1" / "T1" / "1.jpg")  # AU frames are not pretraining images
    items = list(iter_items("synthetic", root))
    assert [(i.key, i.identity) for i in items] == [
        ("broken_000.jpg", None), ("img_000000.jpg", "s03"), ("img_000001.jpg", "s07")]


def test_au_datasets_are_not_enumerated_as_pretraining_images(tmp_path):
    with pytest.raises(ValueError, match="AU dataset"):
        list(iter_items("bp4d", tmp_path))


def test_read_item_works_in_another_process(tmp_path):
    import multiprocessing as mp
    root = tmp_path / "casia_webface"
    root.mkdir()
    with zipfile.ZipFile(root / "f.zip", "w") as zf:
        zf.writestr("1/a.jpg", b"A")
        zf.writestr("2/b.jpg", b"B")
    items = list(iter_items("casia_webface", root))
    read_item(items[0])  # the parent has the archive open before the fork
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.map(read_item, items) == [b"A", b"B"]


# --------------------------------------------------------------------------- verification
def test_manual_source_missing_names_the_path_and_what_to_place(tmp_path):
    root = tmp_path / "download" / "vggface2"
    with pytest.raises(ManualStepRequired) as e:
        verify_source("vggface2", root)
    msg = str(e.value)
    assert str(root) in msg and "train.rec" in msg and "n000002" in msg
    with pytest.raises(ManualStepRequired, match="no images, zip/tar archives or .rec"):
        sources.prepare_source("vggface2", root)
    assert root.is_dir() and not (root / "manifest.json").exists()


def test_prepare_manual_source_writes_manifest(tmp_path):
    root = tmp_path / "ffhq"
    write(root / "images1024x1024" / "00000" / "00000.png")
    write(root / "images1024x1024" / "00000" / "00001.png")
    m = sources.prepare_source("ffhq", root)
    assert m["verified"] and m["counts"]["images"] == 2 and m["counts"]["identities"] == 0
    assert m["details"]["loose_images"] == {"images1024x1024": 2}
    assert sources.verify_source("ffhq", root)["files"] == []
    assert (root / "manifest.json").is_file()


def test_corrupt_placed_archive_is_reported(tmp_path):
    root = tmp_path / "edface_celeb_1m"
    write(root / "hr.zip", b"PK\x03\x04 this is not a full zip")
    with pytest.raises(ManualStepRequired, match="hr.zip: not a readable zip"):
        verify_source("edface_celeb_1m", root)


def _bp4d_fixture(root: Path) -> None:
    header = "0,1,2,4,6,7,10,12,14,15,17,23,24\n"
    for subject, task in [("F001", "T1"), ("F001", "T2"), ("M001", "T1")]:
        rows = "".join(f"{fr},{','.join(['0'] * 12)}\n" for fr in (1, 2))
        (root / "AUCoding" / "AU_OCC").mkdir(parents=True, exist_ok=True)
        (root / "AUCoding" / "AU_OCC" / f"{subject}_{task}.csv").write_text(header + rows)
        for fr in (1, 2):
            write(root / subject / task / f"{fr:04d}.jpg")


def test_verify_bp4d_layout(tmp_path):
    root = tmp_path / "bp4d"
    _bp4d_fixture(root)
    info = verify_source("bp4d", root)
    assert info["counts"] == {"label_files": 3, "subjects": 2, "frames": 6}
    m = sources.prepare_source("bp4d", root)
    assert m["counts"] == info["counts"] and m["role"] == "au"

    for f in (root / "M001" / "T1").iterdir():
        f.unlink()
    with pytest.raises(ManualStepRequired) as e:
        verify_source("bp4d", root)
    assert str(root / "M001" / "T1") in str(e.value) and "AUCoding/AU_OCC" in str(e.value)


def test_verify_bp4d_without_labels_says_where(tmp_path):
    root = tmp_path / "bp4d_plus"
    write(root / "F001" / "T1" / "0001.jpg")
    with pytest.raises(ManualStepRequired, match="AU_OCC is missing"):
        verify_source("bp4d_plus", root)


def _disfa_labels(root: Path) -> None:
    for sn in ("SN001", "SN002"):
        for au in sources.DISFA_LABEL_AUS:
            (root / "ActionUnit_Labels" / sn).mkdir(parents=True, exist_ok=True)
            (root / "ActionUnit_Labels" / sn / f"{sn}_au{au}.txt").write_text("1,0\n2,3\n")


def test_verify_disfa(tmp_path):
    root = tmp_path / "disfa"
    _disfa_labels(root)
    with pytest.raises(ManualStepRequired, match="either layout works") as e:
        verify_source("disfa", root)
    msg = str(e.value)  # the instructions name both layouts, and no extraction step
    assert "RightVideoSN001_comp.avi" in msg and "Images_RightCamera/<SN>/<frame>.jpg" in msg
    assert "ffmpeg" not in msg
    for sn in ("SN001", "SN002"):
        for fr in (1, 2):
            write(root / "Images_RightCamera" / sn / f"{fr}.jpg")
    assert verify_source("disfa", root)["counts"] == {"subjects": 2, "label_files": 16,
                                                      "frames_right": 4}
    (root / "ActionUnit_Labels" / "SN002" / "SN002_au25.txt").unlink()
    with pytest.raises(ManualStepRequired, match="SN002_au25.txt"):
        verify_source("disfa", root)


def test_verify_disfa_accepts_videos_without_extracted_frames(tmp_path, caplog):
    """pipeline/au_data.py reads the videos directly: they are a complete DISFA copy."""
    root = tmp_path / "disfa"
    _disfa_labels(root)
    write(root / "Videos_RightCamera" / "RightVideoSN001_comp.avi")
    write(root / "Videos_RightCamera" / "RightVideoSN002_comp.avi")
    m = sources.prepare_source("disfa", root)
    assert m["verified"] and m["counts"] == {"subjects": 2, "label_files": 16,
                                             "videos_right": 2}
    # Mixed: one subject's frames extracted, the other's only as a video (au_data takes each).
    (root / "Videos_RightCamera" / "RightVideoSN001_comp.avi").unlink()
    write(root / "Images_RightCamera" / "SN001" / "1.jpg")
    assert verify_source("disfa", root)["counts"] == {
        "subjects": 2, "label_files": 16, "frames_right": 1, "videos_right": 1}
    (root / "Videos_RightCamera" / "RightVideoSN002_comp.avi").unlink()
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        verify_source("disfa", root)  # SN001 still has frames: usable, SN002 warned about
    assert "RightVideoSN002_comp.avi" in caplog.text


# --------------------------------------------------------------------------- prepare_source
def _fake_synthetic(monkeypatch) -> list:
    calls = []

    def generate(root, cfg):
        calls.append((Path(root), cfg))
        root = Path(root)
        for i in range(4):
            write(root / "pool" / f"img_{i}.jpg")
        (root / "pool" / "identities.csv").write_text(
            "key,identity\nimg_0.jpg,a\nimg_1.jpg,b\nimg_2.jpg,\n")
        (root / "manifest.json").write_text("generator's own")
        _bp4d_fixture(root / "au")

    monkeypatch.setitem(sys.modules, "pipeline.synthetic",
                        types.SimpleNamespace(generate=generate))
    return calls


def test_prepare_synthetic_calls_the_generator_and_keeps_its_manifest(tmp_path, monkeypatch):
    calls = _fake_synthetic(monkeypatch)
    root = tmp_path / "synthetic"
    m = sources.prepare_source("synthetic", root, synthetic_cfg="cfg")
    assert calls == [(root, "cfg")]
    assert m["counts"]["images"] == 4 and m["counts"]["identities"] == 2
    assert m["counts"]["images_with_identity"] == 2 and m["counts"]["au_label_files"] == 3
    assert (root / "manifest.json").read_text() == "generator's own"
    with pytest.raises(ValueError, match="synthetic_cfg"):
        sources.prepare_source("synthetic", root)


def test_prepare_sources_runs_each_name_once_and_collects_manual_steps(tmp_path, monkeypatch):
    calls = _fake_synthetic(monkeypatch)
    out = sources.prepare_sources(["synthetic", "bp4d", "synthetic"], tmp_path, synthetic_cfg=1)
    assert len(calls) == 1 and list(out["sources"]) == ["synthetic"]
    assert list(out["pending"]) == ["bp4d"] and str(tmp_path / "bp4d") in out["pending"]["bp4d"]


def _laion_urls(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    (root / "urls").mkdir(parents=True)
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a face"]}),
                   root / "urls" / "part-0.parquet")


def test_laion_without_img2dataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "img2dataset_executable", lambda: None)
    root = tmp_path / "laion_face"
    with pytest.raises(ManualStepRequired, match=r"URL lists: .*urls/\*\.parquet missing"):
        sources.prepare_source("laion_face", root)
    _laion_urls(root)
    with pytest.raises(ManualStepRequired, match=r"img2dataset is not installed.*\.\[laion\]"):
        sources.prepare_source("laion_face", root)


def test_laion_runs_img2dataset_and_enumerates_its_shards(tmp_path, monkeypatch):
    """A stand-in img2dataset (same command line) writes one WebDataset tar."""
    fake = tmp_path / "img2dataset"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import io, sys, tarfile, pathlib, json
        a = sys.argv[1:]
        arg = lambda k: a[a.index(k) + 1]
        assert arg("--input_format") == "parquet" and arg("--url_col") == "URL"
        assert arg("--caption_col") == "TEXT" and arg("--output_format") == "webdataset"
        assert arg("--retries") == "3" and arg("--timeout") == "7"
        out = pathlib.Path(arg("--output_folder")); out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "00000.tar", "w") as tf:
            for name, data in [("000000000.jpg", b"jpg0"), ("000000000.json", b"{{}}"),
                               ("000000001.jpg", b"jpg1")]:
                ti = tarfile.TarInfo(name); ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        """))
    fake.chmod(0o755)
    monkeypatch.setattr(sources, "img2dataset_executable", lambda: str(fake))
    root = tmp_path / "laion_face"
    _laion_urls(root)
    m = sources.prepare_source("laion_face", root, retries=3, timeout=7.0)
    assert m["counts"]["images"] == 2
    items = list(iter_items("laion_face", root))
    assert [read_item(i) for i in items] == [b"jpg0", b"jpg1"]
    assert all(isinstance(i, Item) and i.identity is None for i in items)


# --------------------------------------------------------------------------- hardening
def test_manual_step_hint_is_the_module_command(tmp_path):
    """The README runs the stage as a module; every hint says the same."""
    with pytest.raises(ManualStepRequired) as e:
        sources.prepare_source("ffhq", tmp_path / "ffhq")
    with pytest.raises(FileNotFoundError) as missing:
        list(iter_items("ffhq", tmp_path / "nowhere"))
    for msg in (str(e.value), str(missing.value)):
        assert "python -m stages.download --params params.yaml" in msg
        assert "stages/download.py" not in msg


def test_gif_files_are_enumerated(tmp_path):
    root = tmp_path / "vggface2"
    write(root / "n001" / "a.gif")
    write(root / "n001" / "b.GIF")
    zpath = root / "more.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("n002/c.gif", b"gif-c")
    items = list(iter_items("vggface2", root))
    assert [(i.key, i.identity) for i in items] == [
        ("more.zip/n002/c.gif", "n002"), ("n001/a.gif", "n001"), ("n001/b.GIF", "n001")]
    assert read_item(items[0]) == b"gif-c"
    assert sources.prepare_source("vggface2", root)["counts"]["images"] == 3


def test_gif_au_frames_are_not_counted_as_frames(tmp_path):
    """pipeline/au_data.py reads .jpg/.jpeg/.png/.bmp frames only; verification agrees."""
    from pipeline import au_data
    assert set(sources.FRAME_SUFFIXES) == au_data._IMAGE_SUFFIXES
    root = tmp_path / "bp4d"
    _bp4d_fixture(root)
    for f in (root / "M001" / "T1").iterdir():
        f.rename(f.with_suffix(".gif"))
    with pytest.raises(ManualStepRequired, match="M001/T1"):
        verify_source("bp4d", root)


def test_read_item_max_bytes(tmp_path):
    from pipeline.download import TooLargeError
    root = tmp_path / "ffhq"
    write(root / "small.jpg", b"x" * 100)
    write(root / "big.jpg", b"x" * 101)
    with zipfile.ZipFile(root / "a.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("in/small.jpg", b"y" * 100)
        zf.writestr("in/big.jpg", b"y" * 5000)
    rec = root / "r.rec"
    offsets = write_rec(rec, [_rec_data(0, [1.0], b"z" * 100, 0),
                              _rec_data(0, [2.0], b"z" * 101, 1)])
    items = {i.key: i for i in iter_items("ffhq", root)}
    assert set(items) == {"small.jpg", "big.jpg", "a.zip/in/small.jpg", "a.zip/in/big.jpg",
                          f"r.rec@{offsets[0]}", f"r.rec@{offsets[1]}"}
    for key, item in items.items():
        if "small" in key or key.endswith(f"@{offsets[0]}"):
            assert len(read_item(item, max_bytes=100)) == 100
        else:
            with pytest.raises(TooLargeError) as e:
                read_item(item, max_bytes=100)
            assert isinstance(e.value, ValueError) and item.container in str(e.value)
            assert read_item(item) == read_item(item, max_bytes=10_000)  # no limit: whole
    with pytest.raises(TooLargeError, match=r"a\.zip: member 'in/big\.jpg'"):
        read_item(items["a.zip/in/big.jpg"], max_bytes=100)


def test_dangling_symlink_as_source_folder_is_explained(tmp_path):
    root = tmp_path / "download" / "ffhq"
    root.parent.mkdir()
    root.symlink_to(tmp_path / "moved_away")
    out = sources.prepare_sources(["ffhq"], tmp_path / "download")
    msg = out["pending"]["ffhq"]
    assert "symbolic link" in msg and str(tmp_path / "moved_away") in msg
