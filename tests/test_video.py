"""pipeline.video on tiny videos written with PyAV: frame order, timestamps, counts, cursor."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from pipeline import video
from pipeline.video import (FrameNotInVideo, VideoCursor, close_cached, count_frames,
                            iter_frames, read_frame)

SIZE = (64, 48)  # (width, height)


def colour(k: int) -> np.ndarray:
    """Frame k's (0 <= k < 30) solid RGB colour: neighbours differ by 7 levels in R and G."""
    return np.array([20 + 7 * k, 220 - 7 * k, 60 + 5 * (k % 20)], dtype=np.uint8)


def write_video(path: Path, n: int = 24, *, codec: str = "mjpeg", fps: int = 25,
                offset: int = 0) -> Path:
    """``n`` frames of ``SIZE``; frame k is a solid ``colour(k + offset)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pix = {"mjpeg": "yuvj444p", "ffv1": "yuv444p"}[codec]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = *SIZE, pix
        for k in range(n):
            a = np.broadcast_to(colour(k + offset), (SIZE[1], SIZE[0], 3)).copy()
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def which(im, n: int = 30) -> int:
    """The k whose colour(k) is nearest to the image's mean colour (checked to be close)."""
    mean = np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0)
    d = [np.abs(mean - colour(k)).max() for k in range(n)]
    k = int(np.argmin(d))
    assert d[k] < 3, (mean, colour(k))
    return k


@pytest.mark.parametrize("codec", ["mjpeg", "ffv1"])
def test_iter_frames_order_timestamps_and_count(tmp_path, codec):
    path = write_video(tmp_path / f"v.{'avi' if codec == 'mjpeg' else 'mkv'}", 24, codec=codec)
    got = list(iter_frames(path))
    assert [i for i, _, _ in got] == list(range(24))
    assert np.allclose([t for _, t, _ in got], np.arange(24) / 25, atol=1e-3)
    assert all(im.mode == "RGB" and im.size == SIZE for _, _, im in got)
    assert [which(im) for _, _, im in got] == list(range(24))
    assert count_frames(path) == count_frames(path, decode=True) == 24


def test_cursor_decodes_forward_once_and_reopens_only_to_go_back(tmp_path):
    path = write_video(tmp_path / "v.avi", 24)
    with VideoCursor(path) as cur:
        assert [which(cur.get(k)) for k in (0, 3, 3, 10, 23)] == [0, 3, 3, 10, 23]
        assert (cur.opens, cur.decoded) == (1, 24)
        t, im = cur.get_with_time(23)
        assert t == pytest.approx(23 / 25) and which(im) == 23
        assert which(cur.get(2)) == 2 and (cur.opens, cur.decoded) == (2, 27)
        with pytest.raises(FrameNotInVideo, match=r"v\.avi: frame 24 .* 24 frames"):
            cur.get(24)
        with pytest.raises(IndexError):  # end now known: no second decode
            cur.get(30)
        assert cur.opens == 2 and isinstance(FrameNotInVideo("x"), ValueError)
        with pytest.raises(ValueError, match="negative"):
            cur.get(-1)
        assert which(cur.get(5)) == 5


def test_read_frame_caches_one_video(tmp_path):
    a = write_video(tmp_path / "a.avi", 12)
    b = write_video(tmp_path / "b.avi", 6, offset=20)
    try:
        assert [which(read_frame(a, k)) for k in (0, 4, 11)] == [0, 4, 11]
        cur = video._cached[1]
        assert cur.path == a and cur.opens == 1 and cur.decoded == 12
        assert which(read_frame(b, 1)) == 21 and video._cached[1].path == b
        assert cur._container is None  # the previous video was closed
        assert which(read_frame(a, 2)) == 2
    finally:
        close_cached()
    assert video._cached is None


def test_unreadable_videos_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.avi: video file not found"):
        count_frames(tmp_path / "nope.avi")
    with pytest.raises(FileNotFoundError, match=r"nope\.avi"):
        next(iter_frames(tmp_path / "nope.avi"))
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match=r"bad\.avi: cannot open it as a video.*copy it again"):
        count_frames(bad)
    with pytest.raises(ValueError, match=r"bad\.avi"):
        VideoCursor(bad).get(0)
    with pytest.raises(OSError, match="is a folder"):
        count_frames(tmp_path)
    wav = tmp_path / "sound.wav"
    with av.open(str(wav), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                        layout="mono")
        fr.sample_rate = 8000
        for p in s.encode(fr):
            c.mux(p)
    with pytest.raises(ValueError, match=r"sound\.wav: has no video stream"):
        count_frames(wav)


def test_truncated_video(tmp_path):
    """The header still says 24 frames; counting reads the packets, decoding fails in place."""
    full = write_video(tmp_path / "full.avi", 24)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    with av.open(str(cut)) as c:
        assert c.streams.video[0].frames == 24
    n = count_frames(cut)
    assert 5 < n < 24
    cur = VideoCursor(cut)
    assert which(cur.get(3)) == 3
    with pytest.raises(ValueError, match=r"cut\.avi"):
        for k in range(4, 24):
            cur.get(k)
    failed = k
    decoded = cur.decoded
    with pytest.raises(ValueError, match=r"cut\.avi"):  # remembered: no decoding again
        cur.get(failed + 1)
    assert cur.decoded == decoded
    assert which(cur.get(failed - 1)) == failed - 1
