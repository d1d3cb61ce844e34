"""Pretraining batches decoded on the training device (``pretrain.decode: gpu``).

The CPU path (``pretrain.decode: cpu``, :class:`pipeline.pretrain.MapSample`) decodes every
JPEG with Pillow in the DataLoader workers, flips it and normalises it to float, so the
workers hand over 600 kB float tensors per 224 px image and spend most of their CPU time in
libjpeg. The device path moves that work to the training process's device:

- in the workers, :class:`MapRawJpeg` only turns the sample's JPEG bytes into a uint8 tensor
  and draws the flip decision -- from torch's RNG, one draw per sample in the same order as
  ``MapSample``, so the same seed flips the same samples on both paths;
- :func:`collate_jpeg` batches them into a :class:`JpegBatch` (a list of variable-length byte
  tensors and an (N,) bool tensor of flips);
- the training loop calls :func:`decode_batch` with its device: on CUDA one batched nvJPEG
  call, ``torchvision.io.decode_jpeg(list, device="cuda")``, then the flip and the ImageNet
  normalisation as tensor ops on the device. On CPU the same function decodes with
  torchvision's libjpeg-turbo and gives exactly the CPU path's batch (tests check it).

:func:`check_device_decode` runs before any work: ``pretrain.decode: gpu`` without a CUDA
device or without torchvision's GPU decoder stops the run with an error naming the key (no
silent fallback to the slower path).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class JpegBatch:
    """A batch of encoded images: what the loader yields with ``pretrain.decode: gpu``.

    Attributes:
        data: N 1-D uint8 CPU tensors, each one JPEG file.
        flip: (N,) bool, True = flip that image left-right.
        image_size: side S of the (3, S, S) images the batch decodes to.
        keys: the N sample keys (named in decode errors).
    """
    data: list[torch.Tensor]
    flip: torch.Tensor
    image_size: int
    keys: list[str]

    def __len__(self) -> int:
        return len(self.data)


class MapRawJpeg:
    """WebDataset sample (undecoded) -> ``(jpeg bytes, flip, key)``.

    A class, not a closure, so DataLoader workers can pickle it. The flip is drawn exactly
    as :class:`pipeline.pretrain.MapSample` draws it (one ``torch.rand(())`` per sample when
    ``flip`` is on), from torch's RNG that DataLoader seeds per worker. Plain bytes, not
    tensors, cross the worker boundary: a tensor would cost a shared-memory segment each.
    """

    def __init__(self, image_size: int, flip: bool):
        self.image_size = int(image_size)
        self.flip = bool(flip)

    def __call__(self, sample: dict) -> tuple[bytes, bool, str]:
        key = str(sample.get("__key__", "?"))
        data = sample.get("jpg")
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ValueError(f"sample {key!r}: no JPEG bytes under 'jpg' (keys: "
                             f"{sorted(sample)}); re-run the shards stage")
        flip = bool(self.flip and bool(torch.rand(()) < 0.5))
        return bytes(data), flip, key


class CollateJpeg:
    """Collate function: list of :class:`MapRawJpeg` outputs -> :class:`JpegBatch`."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def __call__(self, samples: list[tuple[bytes, bool, str]]) -> JpegBatch:
        return JpegBatch(data=[torch.frombuffer(bytearray(s[0]), dtype=torch.uint8)
                               for s in samples],
                         flip=torch.tensor([s[1] for s in samples], dtype=torch.bool),
                         image_size=self.image_size, keys=[s[2] for s in samples])


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, size, size) uint8, antialiased bicubic (close to, not equal
    to, Pillow's BICUBIC that the CPU path uses; shards are normally already at size)."""
    x = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bicubic",
                                        antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def decode_batch(batch: JpegBatch, device: torch.device | str) -> torch.Tensor:
    """Decode, flip and normalise a :class:`JpegBatch` on ``device``.

    Returns:
        (N, 3, S, S) float32 on ``device``, ImageNet-normalised, flipped where
        ``batch.flip`` says; equal to :class:`pipeline.pretrain.MapSample`'s output for the
        same JPEGs and flips (both decode with libjpeg on CPU; nvJPEG on CUDA may differ by
        a grey level on some pixels).
    Raises:
        ValueError: a JPEG that does not decode, naming its sample key.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    if device.type == "cuda":
        # torchvision's CUDA decoder writes into freshly allocated memory from a private
        # stream without waiting for the caller's stream (pytorch/vision PR #9606: corrupt
        # batches on H100s); drain the caller's stream first.
        torch.cuda.current_stream(device).synchronize()
    try:
        images = decode_jpeg(batch.data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        bad = _first_undecodable(batch)
        raise ValueError(f"pretrain.decode: {bad or 'a sample of the batch'} does not decode "
                         f"as a JPEG on {device} ({e}); rebuild the shards (`dvc repro shards`)"
                         f" or set pretrain.decode: cpu") from e
    s = batch.image_size
    images = [im if im.shape[-2:] == (s, s) else _resize(im, s) for im in images]
    x = torch.stack(images)  # (N, 3, S, S) uint8
    flip = batch.flip.to(device, non_blocking=True).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def _first_undecodable(batch: JpegBatch) -> str | None:
    """``sample '<key>'`` of the first JPEG Pillow cannot open, or None."""
    from PIL import Image

    for key, data in zip(batch.keys, batch.data):
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                img.load()
        except Exception:  # noqa: BLE001 - any failure marks the culprit
            return f"sample {key!r}"
    return None


def check_device_decode(decode: str, device: torch.device) -> None:
    """Fail before any work when ``pretrain.decode: gpu`` cannot run on ``device``.

    Decodes a tiny JPEG on the device, so a torchvision build without nvJPEG is caught here
    and not at the first training step.

    Raises:
        ValueError: naming ``pretrain.decode`` and what to do.
    """
    if decode == "cpu":
        return
    if decode != "gpu":
        raise ValueError(f"pretrain.decode: unknown value {decode!r}; use cpu or gpu")
    if device.type != "cuda":
        raise ValueError(f"pretrain.decode: gpu needs a CUDA device, but pretraining runs on "
                         f"{device}; set pretrain.decode: cpu in params.yaml")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 64, 32)).save(buf, "JPEG")
    probe = JpegBatch([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)],
                      torch.zeros(1, dtype=torch.bool), 16, ["probe"])
    try:
        decode_batch(probe, device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"pretrain.decode: gpu, but torchvision cannot decode JPEGs on "
                         f"{device} ({e}); install a CUDA build of torchvision or set "
                         "pretrain.decode: cpu in params.yaml") from e
