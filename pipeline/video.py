"""Reading frames from video files (PyAV; FFmpeg ships inside its wheel, no system ffmpeg).

Used by the DISFA reader (frames straight from ``Videos_<Left|Right>Camera/*.avi``) and meant
for any user video (e.g. a ``predict`` command). Frames are numbered by a 0-based **index**: the
position of the frame in the decoder's output (presentation order) of the first video stream,
the numbering of ``ffmpeg -i video -fps_mode passthrough -start_number 0 %d.jpg`` (no frames
dropped or duplicated to fit a constant rate).
Images are ``PIL.Image`` in mode RGB, ``width x height`` of the stream (no resizing, no
aspect-ratio correction).

- :func:`iter_frames`: every frame once, in order, with its timestamp in seconds.
- :func:`count_frames`: the exact number of frames (demuxed, not the header's estimate).
- :class:`VideoCursor`: frame ``k`` for increasing ``k`` while decoding the file forward once
  (it re-opens the file only when asked for an earlier frame).
- :func:`read_frame`: :class:`VideoCursor` behind a module-level cache of one open video, so
  callers holding only ``(path, index)`` pairs in frame order (``AuRecord.load``) decode each
  video once.

Errors name the file: a missing path raises :class:`FileNotFoundError`; a file FFmpeg cannot
open or decode raises :class:`ValueError` (or :class:`OSError` for I/O failures such as
permission denied); a frame index past the end raises :class:`FrameNotInVideo` (both an
:class:`IndexError` and a :class:`ValueError`).
"""
from __future__ import annotations

import math
import os
import threading
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import av.error
from PIL import Image

__all__ = ["FrameNotInVideo", "VideoCursor", "close_cached", "count_frames", "iter_frames",
           "read_frame"]


class FrameNotInVideo(IndexError, ValueError):
    """A frame index outside ``0 .. n_frames - 1`` of a video."""


def _error(path: Path, e: BaseException, doing: str) -> Exception:
    """An FFmpeg error as a ValueError (bad data) or OSError (I/O) naming the file."""
    msg = (f"{path}: cannot {doing} ({type(e).__name__}: {e}); the file is damaged, truncated "
           "or not a video FFmpeg can read: check that it plays, or copy it again from its "
           "source")
    return OSError(msg) if isinstance(e, OSError) else ValueError(msg)


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    """Open ``path`` for reading; it must have at least one video stream."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: video file not found; check the path (and that the "
                                "file was copied completely)")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; expected a video file")
    try:
        container = av.open(str(path), metadata_errors="replace")
    except av.error.FFmpegError as e:
        raise _error(path, e, "open it as a video") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: has no video stream (audio only, or not a video); pass a "
                         "video file")
    return container


def _decoded(path: Path, container: av.container.InputContainer
             ) -> Iterator[tuple[int, float, av.VideoFrame]]:
    """(index, seconds, frame not yet converted to RGB) of the first video stream, in order.

    Timestamps: ``(frame.pts * frame.time_base) - (stream.start_time * stream.time_base)``,
    i.e. seconds since the stream's first timestamp, so the first frame is at ~0 s. A frame
    without pts gets ``index / average frame rate`` (NaN when the rate is unknown too).
    """
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    start = (stream.start_time or 0) * (stream.time_base or Fraction(0))
    frames = container.decode(stream)
    index = 0
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.error.FFmpegError as e:
            done = f" (frames 0..{index - 1} decoded)" if index else ""
            raise _error(path, e, f"decode frame {index}{done}") from None
        tb = frame.time_base or stream.time_base
        if frame.pts is not None and tb:
            t = float(frame.pts * tb - start)
        elif rate:
            t = index / float(rate)
        else:
            t = math.nan
        yield index, t, frame
        index += 1


def iter_frames(path: str | os.PathLike) -> Iterator[tuple[int, float, Image.Image]]:
    """Decode a video sequentially: ``(index, timestamp_s, image)`` for every frame.

    Args:
        path: a video file in any format FFmpeg reads (avi, mp4, mov, mkv, webm, ...).

    Yields:
        index: 0-based position of the frame in the first video stream.
        timestamp_s: presentation time in seconds since the stream start, from the frame's
            ``pts * time_base`` (falls back to ``index / average fps`` when a frame has no
            pts; NaN if the rate is unknown as well). Not assumed evenly spaced.
        image: the frame as an RGB ``PIL.Image`` of the stream's ``(width, height)``.

    Raises:
        FileNotFoundError, ValueError, OSError: as the module docstring; a decoding error
        part-way through is raised when reached, after the good frames were yielded.
    """
    path = Path(path)
    container = _open(path)
    try:
        for index, t, frame in _decoded(path, container):
            yield index, t, frame.to_image()
    finally:
        container.close()


def count_frames(path: str | os.PathLike, *, decode: bool = False) -> int:
    """Exact number of frames of the first video stream of ``path``.

    The container's own count (``stream.frames``, from the AVI/MP4 header) is not used: it is
    0 for many formats (mkv, webm, some mpeg) and stays at the full length for a truncated
    file. Instead the stream is read through:

    - ``decode=False`` (default, fast): demux and count the non-empty packets; no decoding.
      Equals the number of decoded frames for every common codec (one packet per frame),
      unless a packet is damaged (then decoding fails at that frame, see :func:`iter_frames`).
    - ``decode=True``: decode every frame and count them; the same number :func:`iter_frames`
      yields (slower: a full decode).
    """
    path = Path(path)
    container = _open(path)
    try:
        if decode:
            return sum(1 for _ in _decoded(path, container))
        stream = container.streams.video[0]
        n = 0
        try:
            for packet in container.demux(stream):
                if packet.size:  # the final flush packet is empty
                    n += 1
        except av.error.FFmpegError as e:
            raise _error(path, e, f"read packet {n}") from None
        return n
    finally:
        container.close()


class VideoCursor:
    """Frames of one video by index, decoding forward: cheap for increasing indices.

    ``get(k)`` decodes from the current position up to frame ``k`` (skipped frames are decoded
    but not converted to RGB). Asking again for the last frame returns it without decoding;
    asking for an earlier frame re-opens the file and decodes from the start (counted in
    :attr:`opens`). The file is opened on the first ``get``; :meth:`close` (or ``with``)
    releases it. Not thread-safe: one cursor per thread.

    Attributes:
        path: the video file.
        opens: how many times the file was opened.
        decoded: frames decoded so far (all opens together).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.opens = 0
        self.decoded = 0
        self._container: av.container.InputContainer | None = None
        self._frames: Iterator[tuple[int, float, av.VideoFrame]] | None = None
        self._next = 0  # index of the frame the decoder yields next
        self._last: tuple[int, float, av.VideoFrame] | None = None
        self._n_frames: int | None = None  # known once the end was reached
        self._failed: tuple[int, Exception] | None = None  # first frame that did not decode

    def __enter__(self) -> "VideoCursor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (a later ``get`` re-opens it)."""
        if self._container is not None:
            self._container.close()
        self._container = self._frames = self._last = None
        self._next = 0

    def _reopen(self) -> None:
        self.close()
        self._container = _open(self.path)
        self._frames = _decoded(self.path, self._container)
        self.opens += 1

    def get_with_time(self, index: int) -> tuple[float, Image.Image]:
        """``(timestamp_s, RGB image)`` of frame ``index`` (0-based); see :func:`iter_frames`.

        Raises:
            FrameNotInVideo: ``index`` is negative or at/after the end of the video.
            ValueError, OSError: the file cannot be opened, or frame ``index`` (or one before
                it) cannot be decoded; later indices then fail at once, without decoding.
        """
        index = int(index)
        if index < 0:
            raise FrameNotInVideo(f"{self.path}: frame index {index} is negative")
        if self._last is not None and self._last[0] == index:
            return self._last[1], self._last[2].to_image()
        if self._n_frames is not None and index >= self._n_frames:
            raise FrameNotInVideo(f"{self.path}: frame {index} requested, but the video has "
                                  f"{self._n_frames} frames (indices 0..{self._n_frames - 1})")
        if self._failed is not None and index >= self._failed[0]:
            raise type(self._failed[1])(str(self._failed[1]))
        if self._frames is None or index < self._next:
            self._reopen()
        assert self._frames is not None
        while self._next <= index:
            try:
                item = next(self._frames)
            except StopIteration:
                self._n_frames = self._next
                self.close()
                raise FrameNotInVideo(
                    f"{self.path}: frame {index} requested, but the video has {self._n_frames} "
                    f"frames (indices 0..{self._n_frames - 1})") from None
            except (ValueError, OSError) as e:
                self._failed = (self._next, e)
                self.close()
                raise
            self.decoded += 1
            self._next = item[0] + 1
            self._last = item
        assert self._last is not None and self._last[0] == index
        return self._last[1], self._last[2].to_image()

    def get(self, index: int) -> Image.Image:
        """Frame ``index`` (0-based) as an RGB ``PIL.Image``; see :meth:`get_with_time`."""
        return self.get_with_time(index)[1]


# One open video per process: AuRecord.load of consecutive frames of one subject reads on.
_cache_lock = threading.Lock()
_cached: tuple[int, VideoCursor] | None = None  # (pid of the owner, cursor)


def read_frame(path: str | os.PathLike, index: int) -> Image.Image:
    """Frame ``index`` (0-based) of ``path`` as RGB, through a cached :class:`VideoCursor`.

    The cache holds one video: reading frames of one file in increasing order decodes it once;
    switching to another file closes the previous one, and going back in one file re-decodes
    from its start. Safe across threads (serialised) and ``fork`` (a child process opens its
    own copy). Errors as :meth:`VideoCursor.get_with_time`.
    """
    global _cached
    path = Path(path)
    with _cache_lock:
        pid = os.getpid()
        if _cached is not None and (_cached[0] != pid or _cached[1].path != path):
            if _cached[0] == pid:
                _cached[1].close()
            _cached = None  # a forked copy: leave the parent's file alone
        if _cached is None:
            _cached = (pid, VideoCursor(path))
        return _cached[1].get(index)


def close_cached() -> None:
    """Close the video held by :func:`read_frame`'s cache (e.g. at the end of a subject)."""
    global _cached
    with _cache_lock:
        if _cached is not None and _cached[0] == os.getpid():
            _cached[1].close()
        _cached = None
