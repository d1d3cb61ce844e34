"""Face front-end: detection on a real photo and on synthetic wild frames, the reference crop,
and the au_shards detection pass (cache, faceless frames)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import matplotlib.cbook as cbook
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import synthetic as S
from pipeline.au_data import build_au_shards, load_index, read_meta
from pipeline.au_faces import (agreement_with_truth, boxes_by_key, detect_dataset,
                               detector_tag, no_face_per_subject, no_face_table)
from pipeline.faces import BoxCrop, crop_box, crop_face, iou, largest, make_detector
from pipeline.params import AuShardsParams, SyntheticParams

# Grace Hopper's portrait (512 x 600) ships inside matplotlib; her face, marked by hand from
# the hairline under the cap to the chin and ear to ear:
HOPPER = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
HOPPER_FACE = (165, 140, 365, 345)


@pytest.fixture(scope="module")
def detector():
    return make_detector("mtcnn", device="cpu", min_face=20, max_side=640, threshold=0.5)


def test_detects_the_face_in_a_real_photograph(detector):
    im = Image.open(HOPPER)
    faces = detector.detect([im])[0]
    assert len(faces) == 1
    f = faces[0]
    assert f.score > 0.95 and iou(f.box, HOPPER_FACE) > 0.6, f
    assert f.landmarks.shape == (5, 2)
    lx, ly = f.landmarks[:, 0], f.landmarks[:, 1]  # eyes above nose above mouth
    assert ly[:2].max() < ly[2] < ly[3:].min() and lx[0] < lx[1]


def test_downscaled_detection_gives_boxes_in_original_pixels():
    im = Image.open(HOPPER).convert("RGB")
    big = im.resize((im.width * 2, im.height * 2))
    small_side = make_detector("mtcnn", device="cpu", min_face=20, max_side=320)
    f = largest(small_side.detect([big])[0])
    doubled = tuple(2 * v for v in HOPPER_FACE)
    assert iou(f.box, doubled) > 0.6


def test_no_face_in_a_blank_frame(detector):
    assert detector.detect([Image.new("RGB", (200, 160), (128, 128, 128))]) == [[]]


def test_reference_crop_box_margin_clip_and_square():
    # 100 x 50 box: 5 px more left/right, 2.5 px more top/bottom (rounded outwards)
    assert crop_box((100, 100, 200, 150), 400, 300) == (95, 97, 205, 153)
    assert crop_box((-10, 5, 50, 400), 100, 300) == (0, 0, 53, 300)       # clipped
    x0, y0, x1, y1 = crop_box((100, 100, 200, 150), 400, 300, square=True)
    assert (x1 - x0, y1 - y0) == (110, 110) and (x0 + x1) / 2 == 150
    im = Image.new("RGB", (400, 300))
    assert crop_face(im, (100, 100, 200, 150), 64).size == (64, 64)
    assert BoxCrop(None)(im) is None
    assert BoxCrop((100, 100, 200, 150))(im).size == (110, 56)


def test_synthetic_wild_frames_are_found_at_their_known_boxes(detector):
    """IoU >= 0.7 with the generator's box on >= 95% of wild frames (a miss counts as 0)."""
    scenes = S.sample_scenes(0)
    W, H = S.au_frame_size(SyntheticParams())
    imgs, truth = [], []
    for k in range(120):
        rng = np.random.default_rng(1000 + k)
        tr = S.in_scene(S.sample_traits(rng, "FM"[k % 2], cohort=True), scenes[0])
        shot = S._sample_wild_frame_shot(rng)
        aus = {a: float(rng.uniform(0.3, 1.0)) for a in S.AUS if rng.uniform() < 0.2}
        imgs.append(S.render_face(tr, aus, shot, W, H))
        truth.append(S.face_box(tr, shot, W, H))
    found = detector.detect(imgs)
    ious = np.array([iou(largest(f).box, t) if f else 0.0 for f, t in zip(found, truth)])
    assert (ious >= 0.7).mean() >= 0.95, np.sort(ious)[:10]


# --------------------------------------------------------------------------- au_shards pass
@pytest.fixture(scope="module")
def wild_set(tmp_path_factory) -> Path:
    """A small synthetic set of wild frames (BP4D layout) with one faceless frame."""
    out = tmp_path_factory.mktemp("wild")
    S.generate(out, SyntheticParams(subjects=6, tasks=1, frames_per_task=6, pool_images=10,
                                    pool_broken=0), progress=False)
    blank = sorted((out / "au" / "F001" / "T1").glob("*.jpg"))[0]
    Image.new("RGB", Image.open(blank).size, (90, 120, 150)).save(blank)  # the face is gone
    return out


class CountingDetector:
    def __init__(self):
        self.inner = make_detector("mtcnn", device="cpu", min_face=20, threshold=0.5)
        self.frames = 0

    def detect(self, images):
        self.frames += len(images)
        return self.inner.detect(images)


def test_detection_pass_caches_counts_and_skips_faceless_frames(wild_set, tmp_path):
    root = wild_set / "au"
    cfg = AuShardsParams(image_size=32, synthetic_parts=3, workers=1)
    cache = tmp_path / "faces" / "synthetic.parquet"
    subjects = [f"F00{i}" for i in (1, 2, 3)] + [f"M00{i}" for i in (1, 2, 3)]
    det = CountingDetector()
    df, counts = detect_dataset("synthetic", root, subjects, cfg, cache, lambda: det,
                                progress=False)
    assert det.frames == len(df) == 36 and counts["detected"] == 36 and cache.is_file()
    blank_key = f"F001_T1_{int(sorted((root / 'F001' / 'T1').glob('*.jpg'))[0].stem)}"
    assert not df.set_index("key").loc[blank_key, "found"]
    assert no_face_per_subject(df).get("F001", 0) >= 1
    assert blank_key in set(no_face_table(df)["key"])
    truth = agreement_with_truth(df, root / S.FACE_BOXES)
    assert truth["frames"] == 36 and truth["iou_ge_0_7"] >= 0.9

    # second pass: everything from the cache, the detector is never built
    def no_detector():
        raise AssertionError("detector built although every frame is cached")
    df2, counts2 = detect_dataset("synthetic", root, subjects, cfg, cache, no_detector,
                                  progress=False)
    assert counts2 == {"cached": 36, "detected": 0, "no_face": counts["no_face"]}
    pd.testing.assert_frame_equal(df.reset_index(drop=True), df2.reset_index(drop=True),
                                  check_dtype=False)
    # other detector settings invalidate the cache
    det3 = CountingDetector()
    cfg3 = AuShardsParams(image_size=32, synthetic_parts=3, workers=1, face_min_size=24)
    assert detector_tag(cfg3) != detector_tag(cfg)
    detect_dataset("synthetic", root, subjects[:1], cfg3, cache, lambda: det3, progress=False)
    assert det3.frames == 6

    # the shards hold crops of the detected boxes; the faceless frame is left out and counted
    out = tmp_path / "shards"
    meta = build_au_shards("synthetic", root, out, cfg, boxes=boxes_by_key(df), progress=False)
    index = load_index(out)
    assert blank_key not in set(index["key"])
    assert meta["counts"]["no_face"] == counts["no_face"] == 36 - len(index)
    assert read_meta(out)["counts"]["frames"] == len(index)


# --------------------------------------------------------------------------- the real layouts
def _paste(canvas_wh: tuple[int, int], scale: float, at: tuple[int, int]) -> tuple[Image.Image, tuple]:
    """Hopper's portrait scaled by ``scale`` at ``at`` on a grey canvas; returns (frame, face)."""
    photo = Image.open(HOPPER).convert("RGB")
    photo = photo.resize((round(photo.width * scale), round(photo.height * scale)))
    frame = Image.new("RGB", canvas_wh, (90, 110, 130))
    frame.paste(photo, at)
    face = tuple(v * scale + at[i % 2] for i, v in enumerate(HOPPER_FACE))
    return frame, face


def test_au_shards_stage_crops_full_size_bp4d_frames_and_disfa_videos(tmp_path, monkeypatch):
    """BP4D frames at 1040x1392 and DISFA .avi videos at 1024x768, laid out as the README
    says, go through the au_shards stage to 224 px crops of the face, no manual step."""
    import av
    import yaml

    from pipeline.au_data import BP4D_AUS, DISFA_AUS
    from stages import au_shards as stage

    dl = tmp_path / "download"
    truth: dict[str, tuple] = {}
    bp = dl / "bp4d"
    for s, subject in enumerate(("F001", "M001")):
        rows = ["0," + ",".join(map(str, BP4D_AUS))]
        for f in (1, 2):
            frame, truth[f"{subject}_T1_{f}"] = _paste((1040, 1392), 1.8, (40 + 60 * s, 300 + 90 * f))
            (bp / subject / "T1").mkdir(parents=True, exist_ok=True)
            frame.save(bp / subject / "T1" / f"{f:04d}.jpg", quality=90)
            rows.append(f"{f}," + ",".join(str((f + a) % 2) for a in BP4D_AUS))
        (bp / "AUCoding" / "AU_OCC").mkdir(parents=True, exist_ok=True)
        (bp / "AUCoding" / "AU_OCC" / f"{subject}_T1.csv").write_text("\n".join(rows) + "\n")
    di = dl / "disfa"
    n = 3
    for au in DISFA_AUS:
        p = di / "ActionUnit_Labels" / "SN001" / f"SN001_au{au}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(f"{i},{(i + au) % 6}\n" for i in range(1, n + 1)))
    video = di / "Videos_RightCamera" / "RightVideoSN001_comp.avi"
    video.parent.mkdir(parents=True)
    with av.open(str(video), "w") as c:
        st = c.add_stream("mjpeg", rate=20)
        st.width, st.height, st.pix_fmt = 1024, 768, "yuvj420p"
        for k in range(n):
            frame, truth[f"SN001_right_{k + 1}"] = _paste((1024, 768), 1.1, (100 + 150 * k, 50))
            for pk in st.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                c.mux(pk)
        for pk in st.encode():
            c.mux(pk)

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    paper = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper.yaml").read_text())
    params["download"]["au_datasets"] = ["bp4d", "disfa"]
    params["finetune"]["runs"] = ["bp4d-1", "disfa-1"]
    params["au_shards"] = {**paper["au_shards"], "workers": 1}   # 224 px, photo settings
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "au_shards"
    stage.main(["--params", str(tmp_path / "params.yaml"), "--download", str(dl),
                "--out", str(out / "data"), "--stats", str(out / "stats.json"),
                "--faces", str(out / "faces")])

    stats = json.loads((out / "stats.json").read_text())
    for ds, frames in (("bp4d", 4), ("disfa", n)):
        assert stats[ds]["frames"] == frames and stats[ds]["faces"]["no_face"] == 0
        cache = pd.read_parquet(out / "faces" / f"{ds}.parquet")
        for r in cache.itertuples(index=False):   # each box is on the pasted face
            assert iou((r.x0, r.y0, r.x1, r.y1), truth[r.key]) > 0.6, (r.key, r.x0, r.y0)
        tars = sorted((out / "data" / ds).glob("*.tar"))
        with tarfile.open(tars[0]) as tf:
            jpg = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
            assert Image.open(tf.extractfile(jpg)).size == (224, 224)
