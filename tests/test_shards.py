"""Tests of pipeline/shards.py: aspect filter, bad inputs, mode conversion, EXIF, determinism,
atomicity and stats of the Face9M-style pretraining shards."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.params import ShardsParams
from pipeline.shards import (SHARD_RE, aspect_ok, build_shards, process_image, sample_key,
                             to_rgb)


# Same fields as pipeline.sources.Item; defined here so these tests do not depend on it.
@dataclass(frozen=True)
class Item:
    source: str
    key: str
    container: str
    member: str | None
    identity: str | None


def read_file(item: Item) -> bytes:
    return Path(item.container).read_bytes()


def read_or_die(item: Item) -> bytes:
    """Reader that simulates a crash (a killed run) at item 'boom' while a KILL file exists."""
    if item.key == "boom" and (Path(item.container).parent / "KILL").exists():
        raise RuntimeError("simulated crash while reading")
    return read_file(item)


def cfg(**kw) -> ShardsParams:
    base = dict(image_size=32, samples_per_shard=4, workers=1, jpeg_quality=90)
    base.update(kw)
    return ShardsParams(**base)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with a seed-dependent tint (realistic, compressible)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0, 1, 3)
    arr = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1),
                    127 + 100 * np.sin((x * a + y * b) / 9 + c)], -1)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def halves(w: int, h: int, left, right, mode: str = "RGB") -> Image.Image:
    img = Image.new(mode, (w, h), left)
    img.paste(Image.new(mode, (w - w // 2, h), right), (w // 2, 0))
    return img


def decode(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(int)


def write_items(tmp: Path, specs: list[tuple[str, str, bytes]]) -> list[Item]:
    """specs: (source, key, file bytes) -> Items whose container is the written file."""
    items = []
    for i, (source, key, data) in enumerate(specs):
        p = tmp / "files" / f"{i:04d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        items.append(Item(source, key, str(p), None, f"id{i % 3}"))
    return items


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def read_shard(path: Path) -> list[tuple[str, bytes, dict]]:
    """(key, jpg, json) per sample, also checking the fixed tar header fields."""
    out, pending = [], {}
    with tarfile.open(path) as tar:
        for m in tar:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
            key, ext = m.name.split(".", 1)  # exactly one dot: the extension separator
            pending.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for key, d in pending.items():
        assert set(d) == {"jpg", "json"}
        out.append((key, d["jpg"], json.loads(d["json"])))
    return out


# --------------------------------------------------------------------------- aspect ratio
@pytest.mark.parametrize("w,h,kept", [
    (300, 200, True), (200, 300, True),      # exactly 1.5 is kept, both orientations
    (301, 200, False), (200, 301, False),    # 1.5 + eps dropped
    (3000, 2000, True), (3001, 2000, False),
    # 1200x799 (1.5019) is drafted to 150x100 (exactly 1.5) at image_size 32: the test must
    # use the original size, or this image would be kept.
    (1200, 799, False),
])
def test_aspect_boundary(w, h, kept):
    res = process_image(encode(smooth(w, h)), cfg(draft=True))
    assert res.status == ("kept" if kept else "dropped_aspect")
    assert (res.width, res.height) == (w, h)


def test_aspect_exact_rational_no_float_error():
    # 1.15 * 20 = 22.999999999999996 in floats; 23/20 is exactly 1.15 and must be kept.
    assert aspect_ok(23, 20, 1.15) and aspect_ok(20, 23, 1.15)
    assert not aspect_ok(24, 20, 1.15)
    assert aspect_ok(10, 10, 1.0) and not aspect_ok(11, 10, 1.0)


@pytest.mark.parametrize("stored,kept", [((200, 300), True), ((200, 301), False)])
def test_aspect_on_exif_rotated_image(stored, kept):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    res = process_image(encode(smooth(*stored), exif=exif), cfg())
    assert res.status == ("kept" if kept else "dropped_aspect")
    # width/height are reported on the oriented image: the axes are swapped
    assert (res.width, res.height) == (stored[1], stored[0])


# --------------------------------------------------------------------------- conversions
def test_exif_rotation_applied_to_pixels():
    exif = Image.Exif()
    exif[0x0112] = 6
    # stored: left half red, right half blue; displayed (90 deg CW): top red, bottom blue
    res = process_image(encode(halves(60, 40, (255, 0, 0), (0, 0, 255)), exif=exif), cfg())
    assert res.status == "kept" and (res.width, res.height) == (40, 60)
    px = decode(res.jpeg)
    assert px.shape == (32, 32, 3)
    assert np.abs(px[4, 16] - [255, 0, 0]).max() < 30
    assert np.abs(px[27, 16] - [0, 0, 255]).max() < 30


def test_cmyk_jpeg_converted():
    img = halves(40, 40, (0, 255, 255, 0), (0, 0, 0, 255), mode="CMYK")  # red | black
    res = process_image(encode(img), cfg())
    px = decode(res.jpeg)
    assert np.abs(px[16, 4] - [255, 0, 0]).max() < 30
    assert px[16, 28].max() < 30


def test_grayscale_and_la_converted():
    res = process_image(encode(Image.new("L", (40, 40), 100), "PNG"), cfg())
    assert np.abs(decode(res.jpeg) - 100).max() <= 3
    la = halves(40, 40, (50, 255), (50, 0), mode="LA")  # right half fully transparent
    px = decode(process_image(encode(la, "PNG"), cfg()).jpeg)
    assert np.abs(px[16, 4] - 50).max() <= 5
    assert px[16, 28].min() >= 250  # transparent -> white, not the hidden grey


def test_sixteen_bit_scaled_not_clipped():
    a = np.full((40, 40), 65535, np.uint16)
    a[:, 20:] = 257 * 40  # 40 in 8 bits; clipping at 255 would make it white
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    px = decode(process_image(encode(img, "PNG"), cfg()).jpeg)
    assert px[16, 4].min() >= 250
    assert np.abs(px[16, 28] - 40).max() <= 4
    # 32-bit "I" (how Pillow opens some 16-bit files) uses the same 16-bit scale
    rgb = to_rgb(Image.fromarray(np.full((4, 4), 25700, np.int32), "I"))
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, 0].tolist() == [100, 100, 100]


def test_palette_converted_with_transparency():
    p = halves(40, 40, (0, 200, 0), (0, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE,
                                                        colors=4)
    black = p.getpixel((39, 0))
    px = decode(process_image(encode(p, "PNG"), cfg()).jpeg)
    assert np.abs(px[16, 4] - [0, 200, 0]).max() < 30 and px[16, 28].max() < 30
    px = decode(process_image(encode(p, "PNG", transparency=black), cfg()).jpeg)
    assert px[16, 28].min() >= 250  # the transparent index becomes white


def test_rgba_composited_over_white():
    img = halves(40, 40, (255, 0, 0, 255), (0, 0, 0, 0), mode="RGBA")
    px = decode(process_image(encode(img, "PNG"), cfg()).jpeg)
    assert np.abs(px[16, 4] - [255, 0, 0]).max() < 30
    assert px[16, 28].min() >= 250


def animated_gif(colours: list[tuple[int, int, int]], size=(40, 40)) -> bytes:
    frames = [Image.new("RGB", size, c) for c in colours]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100,
                   loop=0)
    return buf.getvalue()


def test_gif_gives_its_first_frame():
    data = animated_gif([(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    res = process_image(data, cfg())
    assert res.status == "kept" and res.format == "GIF" and (res.width, res.height) == (40, 40)
    assert np.abs(decode(res.jpeg) - [255, 0, 0]).max() < 30  # frame 0, not a later one


def test_draft_keeps_quality():
    data = encode(smooth(1000, 1000, seed=3), quality=95)
    fast = decode(process_image(data, cfg(image_size=100, draft=True)).jpeg)
    full = decode(process_image(data, cfg(image_size=100, draft=False)).jpeg)
    assert fast.shape == full.shape == (100, 100, 3)
    mse = ((fast - full) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-9)) > 35


# --------------------------------------------------------------------------- the stage
def bad_inputs() -> list[tuple[str, bytes]]:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8))
    whole = encode(noisy, quality=90)
    return [("corrupt", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
            ("truncated", whole[: len(whole) // 2]),
            ("truncated_png", encode(noisy, "PNG")[:3000]),
            ("nonimage", b"this is a text file, not an image\n"),
            ("zerobyte", b"")]


def test_bad_inputs_skipped_and_counted(tmp_path, caplog):
    specs = [("good", f"g{i}", encode(smooth(40, 30, i))) for i in range(3)]
    specs += [("bad", key, data) for key, data in bad_inputs()]
    specs += [("good", "wide", encode(smooth(80, 30)))]
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        stats = build_shards(write_items(tmp_path, specs), read_file, tmp_path / "out", cfg(),
                             progress=False)
    assert stats["sources"] == {
        "bad": {"seen": 5, "kept": 0, "dropped_aspect": 0, "failed": 5, "gif_first_frame": 0},
        "good": {"seen": 4, "kept": 3, "dropped_aspect": 1, "failed": 0, "gif_first_frame": 0}}
    assert stats["total"] == {"seen": 9, "kept": 3, "dropped_aspect": 1, "failed": 5,
                              "gif_first_frame": 0}
    assert stats["shards"] == {"count": 1, "samples_per_shard": 4}
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    for key, _ in bad_inputs():  # each failure is logged with its key and reason
        assert f"bad/{key} (undecodable)" in caplog.text
    samples = read_shard(tmp_path / "out" / "face-000000.tar")
    assert [k for k, _, _ in samples] == ["good-000000000", "good-000000001", "good-000000002"]


def test_gifs_counted_by_name_in_stats(tmp_path):
    # Content decides, not the name: a GIF saved as .jpg is a GIF too.
    specs = [("faces", "a.jpg", encode(smooth(40, 30))),
             ("faces", "b.gif", animated_gif([(0, 0, 255), (255, 255, 0)])),
             ("faces", "c.jpg", animated_gif([(0, 255, 0)])),
             ("faces", "wide.gif", animated_gif([(9, 9, 9)], size=(90, 30))),  # aspect 3
             ("other", "d.png", encode(smooth(30, 30), "PNG"))]
    stats = build_shards(write_items(tmp_path, specs), read_file, tmp_path / "out", cfg(),
                         progress=False)
    assert stats["sources"]["faces"] == {"seen": 4, "kept": 3, "dropped_aspect": 1,
                                         "failed": 0, "gif_first_frame": 2}
    assert stats["sources"]["other"]["gif_first_frame"] == 0
    assert stats["total"]["gif_first_frame"] == 2 and stats["total"]["kept"] == 4
    samples = read_shard(tmp_path / "out" / "face-000000.tar")
    assert np.abs(decode(samples[1][1]) - [0, 0, 255]).max() < 30  # b.gif's first frame


def test_shard_layout_keys_and_metadata(tmp_path):
    specs = [("src_a", f"a/{i}.jpg", encode(smooth(40, 30, i))) for i in range(6)]
    specs[2] = ("src_a", "a/2.jpg", b"broken")
    specs += [("src.b", f"b/{i}.png", encode(smooth(30, 40, i), "PNG")) for i in range(3)]
    out = tmp_path / "out"
    build_shards(write_items(tmp_path, specs), read_file, out, cfg(samples_per_shard=3),
                 progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["face-000000.tar", "face-000001.tar", "face-000002.tar", "stats.json"]
    samples = [s for n in names[:3] for s in read_shard(out / n)]
    # index = position within the source, so the broken a/2 leaves a gap; dots replaced
    assert [k for k, _, _ in samples] == [
        "src_a-000000000", "src_a-000000001", "src_a-000000003", "src_a-000000004",
        "src_a-000000005", "src_b-000000000", "src_b-000000001", "src_b-000000002"]
    assert samples[5][2] == {"source": "src.b", "key": "b/0.png", "width": 30, "height": 40,
                             "identity": "id0"}
    assert all(Image.open(io.BytesIO(j)).size == (32, 32) for _, j, _ in samples)
    assert sample_key("a.b/c", 7) == "a_b_c-000000007"


def many_specs(n: int = 14) -> list[tuple[str, str, bytes]]:
    specs = [("alpha", f"k{i:02d}", encode(smooth(48 + i, 40, i))) for i in range(n)]
    specs[5] = ("alpha", "k05", b"not an image")
    specs[9] = ("alpha", "boom", specs[9][2])
    specs += [("beta", f"k{i}", encode(smooth(40, 44, 100 + i), "PNG")) for i in range(5)]
    return specs


def test_byte_identical_across_runs_and_worker_counts(tmp_path):
    items = write_items(tmp_path, many_specs())
    outs = []
    for name, workers in (("w1a", 1), ("w1b", 1), ("w2", 2)):
        build_shards(items, read_file, tmp_path / name, cfg(samples_per_shard=5, workers=workers),
                     progress=False)
        outs.append(dir_bytes(tmp_path / name))
    assert len([n for n in outs[0] if SHARD_RE.match(n)]) == 4  # 17 kept / 5 per shard
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_run_leaves_no_half_shard_and_rerun_matches(tmp_path, workers):
    items = write_items(tmp_path, many_specs())
    c = cfg(samples_per_shard=3, workers=workers)
    build_shards(items, read_file, tmp_path / "clean", c, progress=False)
    clean = dir_bytes(tmp_path / "clean")

    out = tmp_path / "out"
    out.mkdir()
    # debris of an earlier, larger run: a stale shard, old stats, a half-written temp shard
    (out / "face-000042.tar").write_bytes(b"stale")
    (out / "stats.json").write_text("{}")
    (out / ".tmp-face-000001.tar.abc123").write_bytes(b"half")
    (out / "notes.txt").write_text("not ours")
    (tmp_path / "files" / "KILL").touch()
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_shards(items, read_or_die, out, c, progress=False)
    left = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith(".tmp") for n in left)  # no half shard
    assert "stats.json" not in left  # an interrupted run does not look complete
    shards = [n for n in left if SHARD_RE.match(n)]
    assert shards == [f"face-{i:06d}.tar" for i in range(len(shards))]
    for n in shards:  # the shards that exist are complete and equal to the clean run's
        assert (out / n).read_bytes() == clean[n]
        assert len(read_shard(out / n)) == 3

    (tmp_path / "files" / "KILL").unlink()
    build_shards(items, read_or_die, out, c, progress=False)
    after = dir_bytes(out)
    assert after.pop("notes.txt") == b"not ours"
    assert after == clean


def test_nothing_kept_raises_without_stats(tmp_path):
    items = write_items(tmp_path, [("x", "a", b""), ("x", "b", encode(smooth(90, 20)))])
    with pytest.raises(RuntimeError, match="no image was kept"):
        build_shards(items, read_file, tmp_path / "out", cfg(), progress=False)
    assert not (tmp_path / "out" / "stats.json").exists()


# --------------------------------------------------------------------------- turbo codec
def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like content (gradient, shapes, sensor noise): realistic high frequencies, so
    a wrong decoder scale or resize filter shows in the PSNR."""
    img = smooth(w, h, seed)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        x0, y0 = rng.uniform(0, 0.8, 2) * (w, h)
        x1, y1 = (x0, y0) + rng.uniform(0.1, 0.4, 2) * (w, h)
        img.paste(tuple(int(v) for v in rng.integers(0, 256, 3)),
                  (int(x0), int(y0), int(x1), int(y1)))
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean()
    return 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)


@pytest.fixture
def turbo_calls(monkeypatch):
    """Counts simplejpeg.decode_jpeg calls: proves which path an image took."""
    shards = pytest.importorskip("pipeline.shards")
    sj = pytest.importorskip("simplejpeg")
    assert shards.resolve_codec("turbo") == "turbo"
    calls = []
    real = sj.decode_jpeg

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)
    monkeypatch.setattr(sj, "decode_jpeg", spy)
    return calls


@pytest.mark.parametrize("w,h,mode", [(90, 70, "RGB"), (300, 260, "RGB"), (700, 900, "RGB"),
                                      (2100, 1500, "RGB"), (500, 400, "L")])
def test_turbo_matches_full_resolution_pillow_resize(w, h, mode, turbo_calls):
    # The reference is the naive result: Pillow, no draft, bicubic from the full image.
    data = encode(photo(w, h, seed=w).convert(mode), quality=90)
    fast = process_image(data, cfg(image_size=64), codec="turbo")
    ref = process_image(data, cfg(image_size=64, draft=False), codec="pillow")
    assert len(turbo_calls) == 1  # decoded by libjpeg-turbo, no fallback
    from pipeline.shards import dct_scale
    s = dct_scale(w, h, 64)
    assert turbo_calls[0]["min_width"] == -(-w // s) and turbo_calls[0]["min_height"] == -(-h // s)
    assert fast.status == ref.status == "kept"
    assert (fast.width, fast.height) == (w, h) and fast.format == "JPEG"
    a, b = decode(fast.jpeg), decode(ref.jpeg)
    assert a.shape == (64, 64, 3)
    assert psnr(a, b) >= 40, (w, h, psnr(a, b))
    if mode == "L":
        assert np.abs(a[..., 0] - a[..., 2]).max() <= 2  # grey stays grey


def test_turbo_dct_scale_keeps_twice_the_output_side():
    from pipeline.shards import TURBO_SCALE_MARGIN, dct_scale
    assert TURBO_SCALE_MARGIN == 2
    assert dct_scale(447, 1000, 224) == 1      # 447 < 2 x 224
    assert dct_scale(896, 896, 224) == 2       # 448 >= 448
    assert dct_scale(1789, 1789, 224) == 4     # ceil(1789 / 4) = 448 >= 448
    assert dct_scale(1788, 1788, 224) == 2     # ceil(1788 / 4) = 447
    assert dct_scale(20000, 20000, 224) == 4   # never 1/8 (DC only: blocky)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_turbo_applies_every_exif_orientation_like_pillow(orientation, turbo_calls):
    img = Image.new("RGB", (60, 40), (255, 0, 0))  # red, with a green and a blue corner
    img.paste((0, 255, 0), (0, 0, 20, 15))
    img.paste((0, 0, 255), (40, 25, 60, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, exif=exif, quality=95)
    fast = process_image(data, cfg(), codec="turbo")
    ref = process_image(data, cfg(), codec="pillow")
    assert len(turbo_calls) == 1
    assert (fast.width, fast.height) == (ref.width, ref.height)
    assert (fast.width, fast.height) == ((40, 60) if orientation >= 5 else (60, 40))
    assert np.abs(decode(fast.jpeg) - decode(ref.jpeg)).mean() < 3


def test_turbo_leaves_odd_files_to_pillow(turbo_calls):
    odd = {"cmyk": encode(halves(40, 40, (0, 255, 255, 0), (0, 0, 0, 255), mode="CMYK")),
           "png": encode(photo(40, 40), "PNG"),
           "gif": animated_gif([(255, 0, 0), (0, 255, 0)])}
    for name, data in odd.items():
        fast = process_image(data, cfg(), codec="turbo")
        ref = process_image(data, cfg(), codec="pillow")
        assert fast == ref, name  # same path, same bytes
    assert turbo_calls == []  # none of them reached libjpeg-turbo


def test_turbo_damaged_jpegs_behave_as_with_pillow(turbo_calls):
    whole = encode(photo(128, 128), quality=90)
    for data in (whole[: len(whole) // 2],                              # truncated
                 whole[:400] + bytes(200) + whole[600:],                  # corrupt scan data
                 b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4):            # not a real JPEG
        fast = process_image(data, cfg(), codec="turbo")
        ref = process_image(data, cfg(), codec="pillow")
        assert fast.status == ref.status and fast.reason == ref.reason
        if ref.status == "kept":  # libjpeg-turbo refused (strict); Pillow decoded it
            assert fast.jpeg == ref.jpeg


def test_codec_forced_but_missing_fails_before_any_work(tmp_path, monkeypatch, caplog):
    import sys

    from pipeline import shards
    monkeypatch.setattr(shards, "_TURBO_MODULES", {})
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import simplejpeg -> ImportError
    with pytest.raises(RuntimeError, match=r"shards.codec is 'turbo' but simplejpeg is not "
                                           r"importable.*pip install simplejpeg"):
        shards.resolve_codec("turbo")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.json").write_text("{}")  # an earlier run's output must survive
    items = write_items(tmp_path, [("s", "a", encode(photo(40, 40)))])
    with pytest.raises(RuntimeError, match="shards.codec is 'turbo'"):
        build_shards(items, read_file, out, cfg(codec="turbo"), progress=False)
    assert (out / "stats.json").read_text() == "{}"
    # auto falls back to Pillow, says so, and still builds the shards
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        assert shards.resolve_codec("auto") == "pillow"
        stats = build_shards(items, read_file, out, cfg(codec="auto"), progress=False)
    assert "using Pillow" in caplog.text and stats["total"]["kept"] == 1
    assert shards.resolve_codec("pillow") == "pillow"


@pytest.mark.parametrize("key,value,msg", [
    ("codec", "fast", "shards.codec: 'fast' is not one of"),
    ("codec", 1, "shards.codec"),
    ("min_side", -1, "shards.min_side: -1 is out of range"),
    ("min_side", 22.5, "shards.min_side: expected an integer"),
])
def test_codec_and_min_side_params_validated(tmp_path, key, value, msg):
    import yaml

    from pipeline.params import ParamsError, load_params
    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["shards"][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=msg.replace(".", r"\.")):
        load_params(path)
    assert load_params(root / "configs" / "paper.yaml").shards.min_side == 224


def test_turbo_shards_match_pillow_shards(tmp_path, turbo_calls):
    specs = [("s", f"k{i}", encode(photo(w, h, seed=i), quality=85))
             for i, (w, h) in enumerate([(100, 80), (400, 300), (1000, 800), (260, 300)])]
    specs.append(("s", "png", encode(photo(50, 60), "PNG")))
    items = write_items(tmp_path, specs)
    runs = {}
    for codec in ("turbo", "pillow"):
        out = tmp_path / codec
        stats = build_shards(items, read_file, out, cfg(codec=codec, image_size=48, workers=2),
                             progress=False)
        runs[codec] = (stats, [s for p in sorted(out.glob("face-*.tar")) for s in read_shard(p)])
    assert runs["turbo"][0] == runs["pillow"][0]
    for (k1, j1, m1), (k2, j2, m2) in zip(runs["turbo"][1], runs["pillow"][1], strict=True):
        assert (k1, m1) == (k2, m2)
        assert psnr(decode(j1), decode(j2)) >= 38


# --------------------------------------------------------------------------- min_side
@pytest.mark.parametrize("codec", ["turbo", "pillow"])
def test_min_side_drops_small_images_and_counts_them(tmp_path, codec):
    exif = Image.Exif()
    exif[0x0112] = 6
    specs = [("s", "tiny", encode(photo(40, 30))),            # shorter side 30 < 32: dropped
             ("s", "edge", encode(photo(40, 32))),            # exactly 32: kept
             ("s", "rot", encode(photo(40, 31), exif=exif)),  # rotated, 31 < 32: dropped
             ("s", "png", encode(photo(31, 33), "PNG")),      # any format: dropped
             ("s", "both", encode(photo(20, 60))),            # aspect first: dropped_aspect
             ("t", "big", encode(photo(64, 48)))]
    items = write_items(tmp_path, specs)
    stats = build_shards(items, read_file, tmp_path / "out", cfg(min_side=32, codec=codec),
                         progress=False)
    assert stats["sources"]["s"] == {"seen": 5, "kept": 1, "dropped_aspect": 1, "failed": 0,
                                     "gif_first_frame": 0, "dropped_small": 3}
    assert stats["total"]["dropped_small"] == 3 and stats["total"]["kept"] == 2
    keys = [m["key"] for p in sorted((tmp_path / "out").glob("face-*.tar"))
            for _, _, m in read_shard(p)]
    assert keys == ["edge", "big"]
    res = process_image(encode(photo(40, 31), exif=exif), cfg(min_side=32, codec=codec))
    assert res.status == "dropped_small" and (res.width, res.height) == (31, 40)
    # off (0, the default): nothing dropped for size, and no dropped_small key in the stats
    stats = build_shards(items, read_file, tmp_path / "out0", cfg(codec=codec), progress=False)
    assert stats["total"]["kept"] == 5 and "dropped_small" not in stats["total"]
