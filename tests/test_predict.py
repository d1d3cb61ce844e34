"""``fmae-iat predict``: the model file a real finetuning run writes, the CSV it produces on
images, folders and videos, faceless frames, unreadable files, the plot, bounded memory, and
agreement with the finetune stage's own per-frame probabilities."""
from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import av
import matplotlib.cbook as cbook
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import predict as P
from pipeline import synthetic as S
from pipeline.au_data import build_au_shards
from pipeline.au_export import load_au_model
from pipeline.finetune import finetune
from pipeline.models import vit
from pipeline.params import AuShardsParams, FinetuneParams, SyntheticParams, build

HOPPER = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # a real photo, one face
TINY = vit.ViTSize(embed_dim=32, depth=2, num_heads=2, patch_size=8)
IMG = 32
OPENFACE = ["frame", "face_id", "timestamp", "confidence", "success", "input"]


# --------------------------------------------------------------------------- a real tiny run
def _finetune_cfg(**kw) -> FinetuneParams:
    base = {"image_size": IMG, "epochs": 2, "warmup_epochs": 1, "batch_size": 8,
            "save_backbone_epochs": [], "num_workers": 0, "amp": "off",
            "augment": {"rand_augment": ""}}
    base.update(kw)
    return build(FinetuneParams, base, "finetune.")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Synthetic AU data -> AU shards -> a tiny pretrained encoder -> two finetuning runs
    (fmae fold 1; iat fold 2 with a validation split)."""
    root = tmp_path_factory.mktemp("predict")
    S.generate(root / "synthetic", SyntheticParams(subjects=6, tasks=1, frames_per_task=6,
                                                   frame_size=64, wild=False, pool_images=10,
                                                   pool_broken=0), progress=False)
    au_dir = root / "au_shards" / "synthetic"
    build_au_shards("synthetic", root / "synthetic" / "au", au_dir,
                    AuShardsParams(image_size=IMG, synthetic_parts=3, workers=1), progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(vit.VIT_SIZES, "tiny", TINY)
        torch.manual_seed(0)
        enc = vit.build_vit("tiny", IMG, 8, global_pool="token")
        ckpt = root / "pretrained.pt"
        torch.save({"model": enc.state_dict(), "config": {"model_size": "tiny",
                                                           "img_size": IMG, "patch_size": 8}},
                   ckpt)
        out = {}
        for variant, fold, kw in (("fmae", 1, {}), ("iat", 2, {"val_fraction": 0.3})):
            out[variant] = root / "finetune" / variant / f"synthetic-{fold}"
            finetune(au_dir, ckpt, out[variant], _finetune_cfg(**kw), dataset="synthetic",
                     fold=fold, variant=variant, lambda_=2.0, model_size="tiny", patch_size=8,
                     seed=0)
    out["au_dir"] = au_dir
    return out


def test_every_finetuning_run_writes_its_model_file(runs):
    for variant, fold, lam in (("fmae", 1, 0.0), ("iat", 2, 2.0)):
        run = runs[variant]
        model, info = load_au_model(run / "model.safetensors")
        metrics = json.loads((run / "metrics.json").read_text())
        assert info["aus"] == metrics["aus"] == list(S.AUS)
        assert (info["dataset"], info["fold"], info["variant"], info["lambda"], info["epoch"]) \
            == ("synthetic", fold, variant, lam, 2)
        assert info["image_size"] == IMG and info["patch_size"] == 8
        assert info["model"]["embed_dim"] == 32 and info["model"]["depth"] == 2
        assert info["preprocess"]["resize"] == [IMG, IMG]
        assert model.id_head is None and not model.training
    # A validation split gives a validation-selected threshold, which becomes the default.
    _, fmae = load_au_model(runs["fmae"] / "model.safetensors")
    _, iat = load_au_model(runs["iat"] / "model.safetensors")
    assert fmae["thresholds"] == {"fixed": 0.5, "val_selected": None} and fmae["threshold"] == 0.5
    t = iat["thresholds"]["val_selected"]
    assert 0 < t < 1 and iat["threshold"] == t


def _extract_jpegs(au_dir: Path, subjects: list[str], dest: Path) -> list[str]:
    """The shards' JPEG bytes of ``subjects``, unchanged, as ``dest/<subject>/<key>.jpg``."""
    keys = []
    for tar in sorted(au_dir.glob("*.tar")):
        if tar.name.split("-")[0] not in subjects:
            continue
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    key = m.name[:-len(".jpg")]
                    (dest / key.split("_")[0]).mkdir(parents=True, exist_ok=True)
                    (dest / key.split("_")[0] / m.name).write_bytes(t.extractfile(m).read())
                    keys.append(key)
    return sorted(keys)


def test_predict_reproduces_the_finetune_stages_probabilities(runs, tmp_path):
    run = runs["fmae"]
    pred = pd.read_parquet(run / "predictions.parquet")
    final = pred[pred["epoch"] == pred["epoch"].max()].set_index("key")
    subjects = sorted(set(final["subject"]))
    keys = _extract_jpegs(runs["au_dir"], subjects, tmp_path / "frames")
    assert keys == sorted(final.index) and len(keys) == 12
    out = tmp_path / "aus.csv"
    assert P.main(["predict", str(tmp_path / "frames"), "--model", str(run), "--out", str(out),
                   "--no-crop", "--batch-size", "5", "--quiet", "--device", "cpu"]) == 0
    got = pd.read_csv(out)
    got["key"] = got["input"].map(lambda p: Path(p).stem)
    got = got.set_index("key").loc[keys]
    cols = [f"AU{a:02d}" for a in S.AUS]
    want = final.loc[keys, [f"prob_AU{a}" for a in S.AUS]].to_numpy(np.float64)
    diff = np.abs(got[cols].to_numpy(np.float64) - want)
    assert diff.max() <= 1e-4, diff.max()
    assert (got["success"] == 1).all() and got["confidence"].isna().all()
    assert (got[[f"{c}_c" for c in cols]].to_numpy() == (got[cols].to_numpy() >= 0.5)).all()
    # the folder is read recursively and in sorted order
    assert got["input"].tolist() == sorted(got["input"].tolist())


# --------------------------------------------------------------------------- inputs
def _wild_frames(n: int, seed: int = 3) -> list[Image.Image]:
    """``n`` synthetic wild frames (192 x 144) of one person making different AUs (seed 3:
    MTCNN scores every one of them above 0.97)."""
    W, H = S.au_frame_size(SyntheticParams())
    scene = S.sample_scenes(0)[0]
    rng = np.random.default_rng(seed)
    traits = S.in_scene(S.sample_traits(rng, "F", cohort=True), scene)
    shot = S._sample_wild_frame_shot(rng)
    frames = []
    for k in range(n):
        aus = {a: 0.9 for a in S.AUS if (k + a) % 3 == 0}
        frames.append(S.render_face(traits, aus, shot, W, H))
    return frames


def write_video(path: Path, frames: list[Image.Image], fps: int = 10) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=fps)
        s.width, s.height = frames[0].size
        s.pix_fmt = "yuvj444p"
        for im in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.asarray(im), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A video (6 face frames, then 2 blank ones), a photo folder (Grace Hopper, a blank
    image, a broken JPEG, a text file) and a file that is no video."""
    root = tmp_path_factory.mktemp("inputs")
    frames = _wild_frames(6)
    blank = Image.new("RGB", frames[0].size, (128, 128, 128))
    video = write_video(root / "clip.avi", frames + [blank, blank])
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(HOPPER, photos / "hopper.jpg")
    Image.new("RGB", (320, 240), (90, 120, 150)).save(photos / "sub" / "blank.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not an image, ignored in folders")
    bad_video = root / "bad.mp4"
    bad_video.write_bytes(b"\x00" * 2048)
    return {"video": video, "photos": photos, "bad_video": bad_video}


def _read_raw(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_video_and_photo_folder_to_csv(runs, inputs, tmp_path, capsys):
    out, plot = tmp_path / "aus.csv", tmp_path / "aus.png"
    rc = P.main(["predict", str(inputs["video"]), str(inputs["photos"]), str(inputs["bad_video"]),
                 "--model", str(runs["iat"] / "model.safetensors"), "--out", str(out),
                 "--plot", str(plot), "--face-threshold", "0.5", "--batch-size", "3",
                 "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0
    # unreadable files are named and skipped; the folder's text file is ignored silently
    assert f"{inputs['photos'] / 'broken.jpg'}: cannot read it as an image" in err
    assert f"{inputs['bad_video']}: cannot read it as a video" in err
    assert "notes.txt" not in err and "2 skipped" in err

    header, rows = _read_raw(out)
    names = [f"AU{a:02d}" for a in S.AUS]
    assert header == OPENFACE + names + [f"{n}_c" for n in names]
    assert names[:3] == ["AU01", "AU02", "AU04"]
    df = pd.read_csv(out)
    assert df["input"].tolist() == [str(inputs["video"])] * 8 + [
        str(inputs["photos"] / "hopper.jpg"), str(inputs["photos"] / "sub" / "blank.png")]

    vid = df.iloc[:8]
    assert vid["frame"].tolist() == list(range(1, 9)) and (vid["face_id"] == 0).all()
    assert np.allclose(vid["timestamp"], np.arange(8) / 10, atol=1e-3)
    assert vid["success"].tolist() == [1] * 6 + [0] * 2
    faces = vid.iloc[:6]
    assert faces["confidence"].between(0.5, 1).all()
    assert faces[names].stack().between(0, 1).all() and faces[names].notna().all().all()
    thr = load_au_model(runs["iat"] / "model.safetensors")[1]["threshold"]
    assert (faces[[f"{n}_c" for n in names]].to_numpy() == (faces[names].to_numpy() >= thr)).all()
    # faceless frames: success 0 and empty AU cells (really empty in the file)
    for raw in rows[6:8] + rows[9:10]:
        assert raw[4] == "0" and raw[3] == "" and all(v == "" for v in raw[6:])
    hopper = df.iloc[8]
    assert (hopper["frame"], hopper["timestamp"], hopper["success"]) == (1, 0.0, 1)
    assert hopper["confidence"] > 0.95
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(plot).size[1] > 400
    assert not list(tmp_path.glob(".tmp-*"))


def test_threshold_option_sets_the_presence_columns(runs, inputs, tmp_path):
    out = tmp_path / "aus.csv"
    assert P.main(["predict", str(inputs["photos"] / "hopper.jpg"), "--model", str(runs["fmae"]),
                   "--out", str(out), "--threshold", "0", "--quiet"]) == 0
    df = pd.read_csv(out)
    assert (df[[c for c in df.columns if c.endswith("_c")]] == 1).all().all()
    assert P.main(["predict", str(inputs["photos"] / "hopper.jpg"), "--model", str(runs["fmae"]),
                   "--out", str(out), "--threshold", "1.5", "--quiet"]) == 1


def test_nothing_readable_is_an_error_and_writes_no_csv(runs, inputs, tmp_path, capsys):
    out = tmp_path / "aus.csv"
    rc = P.main(["predict", str(inputs["photos"] / "broken.jpg"), str(tmp_path / "missing.mp4"),
                 "--model", str(runs["fmae"]), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists() and not list(tmp_path.glob(".tmp-*"))
    assert "broken.jpg: cannot read it as an image" in err
    assert "missing.mp4: no such file or folder" in err
    assert "none of the 1 input file(s) could be read" in err


def test_model_argument_errors_are_named(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert P.main(["predict", str(HOPPER), "--model", str(tmp_path / "run"), "--out",
                   str(tmp_path / "a.csv")]) == 1
    assert "run: a folder without model.safetensors" in capsys.readouterr().err


def test_video_frames_stream_in_bounded_batches(runs, tmp_path, monkeypatch):
    """Frames are decoded only a few batches ahead of the model, however long the video."""
    frames = [Image.new("RGB", (48, 32), (10 * k % 255, 80, 120)) for k in range(40)]
    video = write_video(tmp_path / "long.avi", frames, fps=25)
    import pipeline.video as V
    decoded = {"n": 0}
    real_iter = V.iter_frames

    def counting(path):
        for item in real_iter(path):
            decoded["n"] += 1
            yield item
    monkeypatch.setattr(V, "iter_frames", counting)
    ahead, done = [], [0]
    real_call = P.Predictor.__call__

    def spy(self, images):
        out = real_call(self, images)
        done[0] += len(images)
        ahead.append(decoded["n"] - done[0])  # decoded, not yet through the model
        return out
    monkeypatch.setattr(P.Predictor, "__call__", spy)
    summary = P.predict_files([video], runs["fmae"], tmp_path / "aus.csv", batch_size=4,
                              crop=False, progress=False)
    assert summary.frames == summary.rows == 40 and summary.read == 1
    assert len(ahead) == 10 and max(ahead) <= 4 * 4  # queue (2) + in hand + being built


def test_console_script_is_declared():
    import tomllib
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml")
                            .read_text())["project"]
    assert project["scripts"]["fmae-iat"] == "pipeline.predict:main"
    with pytest.raises(SystemExit):
        P.main(["predict", "--help"])
