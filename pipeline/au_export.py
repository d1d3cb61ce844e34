"""The trained AU model as one self-describing file: ``<run>/model.safetensors``.

Every finetuning run (:func:`pipeline.finetune.finetune`) ends by writing its final model here;
``fmae-iat predict`` (:mod:`pipeline.predict`) reads it. The file is a plain safetensors file:
loading it needs no pickle and no code from this project beyond building a timm ViT.

Tensors carry the names of the authors' released checkpoints (faces-and-inference.md), so
one key layout serves both: the timm ``VisionTransformer`` encoder (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``), ``fc_norm.*`` (the LayerNorm after
mean pooling) and the AU head ``head.weight`` (A, D) / ``head.bias`` (A,). The identity head
of IAT is not saved: it plays no part in AU prediction.

Metadata (safetensors' string-to-string header; every value is JSON):

- ``format`` ``"fmae-iat-au-model"``, ``format_version`` ``1``;
- ``aus``: AU numbers in output order, e.g. ``[1, 2, 4, ...]``;
- ``image_size``, ``patch_size``: input side and patch side in pixels;
- ``model``: ``{"model_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size",
  "patch_size", "global_pool": "avg", "qkv_bias": true, "norm_eps": 1e-6}``;
- ``preprocess``: the finetuning evaluation transform, ``{"resize": [S, S],
  "interpolation": "bicubic", "mean": [...], "std": [...]}`` (a plain resize of the face
  crop to S x S, to [0, 1], normalised per channel);
- ``thresholds``: ``{"fixed": 0.5, "val_selected": t | null}`` (``val_selected``: the single
  threshold maximising mean F1 on the validation split at the final epoch, when
  ``finetune.val_fraction > 0``); ``threshold``: the one ``predict`` uses by default
  (``val_selected`` when there is one, else 0.5);
- ``dataset``, ``fold``, ``variant``, ``lambda``, ``epoch``, ``source``.

Nothing in it changes from run to run with the same weights (no time, no commit): DVC hashes
stay stable.
"""
from __future__ import annotations

import json
import math
import os
import struct
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pipeline.io import atomic_path

FORMAT = "fmae-iat-au-model"
FORMAT_VERSION = 1
HEAD_KEYS = ("head.weight", "head.bias")
META_KEYS = ("format", "format_version", "aus", "image_size", "patch_size", "model",
             "preprocess", "thresholds", "threshold", "dataset", "fold", "variant", "lambda",
             "epoch", "source")
# The normalisation of the MAE/FMAE finetuning reference (timm's ImageNet defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_NAME = "model.safetensors"


# --------------------------------------------------------------------------- preprocessing
def describe_eval_transform(transform) -> dict:
    """The ``preprocess`` metadata of finetuning's evaluation transform.

    Accepts exactly ``Compose([Resize((S, S)), ToTensor(), Normalize(mean, std)])`` (what
    :func:`pipeline.finetune.build_transforms` returns for evaluation) and refuses anything
    else, so a changed evaluation transform cannot go unrecorded.
    """
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    kinds = [type(t).__name__ for t in steps]
    if kinds != ["Resize", "ToTensor", "Normalize"]:
        raise ValueError(f"cannot describe the evaluation transform {kinds} for the model file; "
                         "expected [Resize, ToTensor, Normalize]. Teach "
                         "pipeline/au_export.py (describe_eval_transform, eval_transform) the "
                         "new steps so predict applies them too")
    resize, _, norm = steps
    size = resize.size
    if isinstance(size, int) or len(size) != 2:
        raise ValueError(f"evaluation Resize size {size!r}: expected (S, S) (a plain resize)")
    interp = resize.interpolation
    interp = interp.value if isinstance(interp, T.InterpolationMode) else str(interp)
    return {"resize": [int(size[0]), int(size[1])], "interpolation": interp,
            "mean": [float(v) for v in norm.mean], "std": [float(v) for v in norm.std]}


def eval_transform(preprocess: dict):
    """PIL image -> (3, S, S) tensor: the transform ``preprocess`` describes (the same
    torchvision operations finetuning evaluated with)."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(preprocess.get("interpolation", "bicubic"))
    return T.Compose([T.Resize(tuple(preprocess["resize"]), interpolation=mode), T.ToTensor(),
                      T.Normalize(preprocess["mean"], preprocess["std"])])


def default_preprocess(image_size: int) -> dict:
    """The reference's evaluation preprocessing at ``image_size`` (released checkpoints)."""
    return {"resize": [image_size, image_size], "interpolation": "bicubic",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


# --------------------------------------------------------------------------- model
def encoder_config(encoder: nn.Module, model_size: str | None) -> dict:
    """The ``model`` metadata of a timm VisionTransformer built by ``build_vit(...,
    global_pool="avg")``."""
    blk = encoder.blocks[0]
    D = int(encoder.embed_dim)
    p = encoder.patch_embed.patch_size
    p = int(p[0] if isinstance(p, (tuple, list)) else p)
    img = encoder.patch_embed.img_size
    img = int(img[0] if isinstance(img, (tuple, list)) else img)
    return {"model_size": model_size, "embed_dim": D, "depth": len(encoder.blocks),
            "num_heads": int(blk.attn.num_heads),
            "mlp_ratio": blk.mlp.fc1.out_features / D, "img_size": img, "patch_size": p,
            "global_pool": "avg", "qkv_bias": blk.attn.qkv.bias is not None,
            "norm_eps": float(blk.norm1.eps)}


def build_encoder(config: dict) -> nn.Module:
    """An untrained timm VisionTransformer of the ``model`` metadata (finetuning layout:
    mean-pooled patch tokens + ``fc_norm``, no classifier)."""
    from timm.models.vision_transformer import VisionTransformer

    try:
        return VisionTransformer(
            img_size=int(config["img_size"]), patch_size=int(config["patch_size"]),
            embed_dim=int(config["embed_dim"]), depth=int(config["depth"]),
            num_heads=int(config["num_heads"]), mlp_ratio=float(config.get("mlp_ratio", 4.0)),
            qkv_bias=bool(config.get("qkv_bias", True)),
            norm_layer=partial(nn.LayerNorm, eps=float(config.get("norm_eps", 1e-6))),
            num_classes=0, global_pool="avg", fc_norm=True)
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"model config {config} cannot build a ViT ({type(e).__name__}: "
                         f"{e})") from e


def build_au_model(config: dict, n_aus: int) -> nn.Module:
    from pipeline.models.au_model import AUModel
    return AUModel(build_encoder(config), n_aus)


def au_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Encoder + fc_norm + AU head of an :class:`AUModel`, in the released checkpoints'
    names (the ID head is left out); contiguous CPU copies."""
    state = {k: v for k, v in model.encoder.state_dict().items()}
    state["head.weight"] = model.au_head.weight
    state["head.bias"] = model.au_head.bias
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def load_au_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Put ``state`` (released names) into an :class:`AUModel`; every key must match.

    Raises:
        ValueError: naming ``where`` and the missing, unexpected and mis-shaped keys.
    """
    target = {**model.encoder.state_dict(), "head.weight": model.au_head.weight,
              "head.bias": model.au_head.bias}
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(target[k].shape)})"
              for k in sorted(set(state) & set(target))
              if tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing[:12]}" if missing else "",
                 f"unexpected keys {unexpected[:12]}" if unexpected else "",
                 f"wrong shapes {shapes[:8]}" if shapes else ""]
        raise ValueError(f"{where}: weights do not fit the AU model: "
                         f"{'; '.join(p for p in parts if p)}")
    enc = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    model.encoder.load_state_dict(enc, strict=True)
    with torch.no_grad():
        model.au_head.weight.copy_(state["head.weight"])
        model.au_head.bias.copy_(state["head.bias"])


# --------------------------------------------------------------------------- save / load
def save_au_model(path: str | Path, model: nn.Module, *, aus: Sequence[int], preprocess: dict,
                  dataset: str, fold: int | None, variant: str, lambda_: float, epoch: int,
                  model_size: str | None = None, val_threshold: float | None = None,
                  source: str = "pipeline.finetune") -> dict:
    """Write ``model`` (an :class:`AUModel`) and its description to ``path`` atomically.

    Args:
        path: usually ``<run>/model.safetensors``.
        model: the trained model (its ID head, if any, is not saved).
        aus: AU numbers in the order of the head's outputs.
        preprocess: :func:`describe_eval_transform` of the evaluation transform.
        dataset, fold, variant, lambda_, epoch: where the weights come from.
        model_size: the ``VIT_SIZES`` name, for people reading the file.
        val_threshold: the validation-selected threshold, or None.
        source: what wrote the file.

    Returns:
        the metadata written (decoded).
    """
    from safetensors.torch import save

    state = au_state_dict(model)
    aus = [int(a) for a in aus]
    if state["head.weight"].shape[0] != len(aus):
        raise ValueError(f"the AU head has {state['head.weight'].shape[0]} outputs but "
                         f"{len(aus)} AUs were given ({aus})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: refusing to save a model with NaN/inf weights ({bad[:5]})")
    cfg = encoder_config(model.encoder, model_size)
    thresholds = {"fixed": 0.5, "val_selected": None if val_threshold is None
                  else float(val_threshold)}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "aus": aus,
            "image_size": cfg["img_size"], "patch_size": cfg["patch_size"], "model": cfg,
            "preprocess": preprocess, "thresholds": thresholds,
            "threshold": thresholds["val_selected"] if thresholds["val_selected"] is not None
            else 0.5,
            "dataset": dataset, "fold": None if fold is None else int(fold), "variant": variant,
            "lambda": float(lambda_), "epoch": int(epoch), "source": source}
    header = {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}
    data = _canonical_header(save(state, metadata=header))
    with atomic_path(path, suffix=".safetensors") as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return meta


def _canonical_header(data: bytes) -> bytes:
    """The same safetensors bytes with the metadata keys sorted.

    safetensors writes its metadata map in hash order, which differs between runs: equal
    weights would give files of different hashes, and DVC would see a changed output. The
    tensors' entries and data are kept as they are (their offsets refer to the data block);
    the header is padded with spaces to a multiple of 8 bytes, as safetensors does.
    """
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None) or {}
    canonical = {"__metadata__": dict(sorted(meta.items())), **header}
    text = json.dumps(canonical, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The decoded metadata of a model file, or None when ``path`` is not a safetensors file
    written by :func:`save_au_model` (e.g. a released torch checkpoint)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not safetensors at all: not ours
        return None
    if json.loads(raw.get("format", "null") or "null") != FORMAT:
        return None
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: metadata {k!r} is not JSON ({v[:60]!r}); the file was "
                             "not written by save_au_model or is damaged") from None
    return out


def load_au_model(path: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, dict]:
    """Read a model file written by :func:`save_au_model` (safetensors only, no pickle).

    Returns:
        (the :class:`AUModel` on ``device`` in eval mode, its metadata dict plus ``path``).

    Raises:
        FileNotFoundError: no file. ValueError: naming the file, when it is no model file of
        this format (version, missing metadata, weights that do not fit).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    meta = read_metadata(path)
    if meta is None:
        raise ValueError(f"{path}: not an AU model file of this project (no {FORMAT!r} "
                         "metadata); for the authors' released checkpoints use "
                         "pipeline.released.load_released_au_model")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: model file format version {meta.get('format_version')} "
                         f"but this code reads version {FORMAT_VERSION}; update the code")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks {missing}; the file is damaged")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    aus = [int(a) for a in meta["aus"]]
    model = build_au_model(meta["model"], len(aus))
    load_au_weights(model, state, str(path))
    model.to(device).eval()
    thr = float(meta["threshold"])
    if not (0.0 <= thr <= 1.0) or math.isnan(thr):
        raise ValueError(f"{path}: threshold {thr} outside [0, 1]")
    return model, {**meta, "aus": aus, "path": str(path)}
