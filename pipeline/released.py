"""The authors' released FMAE-IAT weights (faces-and-inference.md), loaded safely.

Two kinds of file are released (CC BY-NC 4.0, cloud links in the authors' README):

- **finetuned AU models** (FMAE-IAT on BP4D, ViT-L, one per fold):
  ``torch.save({"model": state_dict, ...})``, some with a pickled ``argparse.Namespace``
  under ``"args"``. Keys: the timm ViT encoder (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.N.*``), ``fc_norm.*``, the AU head ``head.*`` (12 outputs
  on BP4D, AU order 1 2 4 6 7 10 12 14 15 17 23 24) and the identity head ``ID_head.*`` (41
  outputs on BP4D). :func:`load_released_au_model` reads them for ``fmae-iat predict``;
- **pretrained FMAE encoders** (ViT-S/B/L on Face9M) in the MAE checkpoint format: these go
  to ``pretrain.checkpoint`` and are read by :func:`pipeline.pretrain.import_checkpoint`
  (which already accepts the reference MAE keys and the pickled Namespace; nothing here).

Reading never runs arbitrary pickles: :func:`pipeline.models.mae.load_checkpoint` uses
``torch.load(weights_only=True)`` and allows exactly one extra class, ``argparse.Namespace``
(a plain attribute bag), refusing anything else with a message. The ViT size is read off the
tensor shapes; every key must be accounted for (the ID head is dropped on purpose), and the
missing or unexpected keys are named in the error.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pipeline.au_export import build_au_model, default_preprocess, load_au_weights

log = logging.getLogger(__name__)

BP4D_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
ID_HEAD_PREFIXES = ("ID_head.", "id_head.")
# Output count -> AU set, when the caller names none: only BP4D's finetuned weights are
# released (BP4D+ uses the same 12 AUs).
AUS_BY_OUTPUTS = {12: ("bp4d", BP4D_AUS)}


def au_set(spec: str | Sequence[int]) -> list[int]:
    """AU numbers from a dataset name (``bp4d``, ``bp4d_plus``, ``disfa``, ``synthetic``) or
    a list / comma-separated string of numbers (``"1,2,4"``)."""
    if not isinstance(spec, str):
        return [int(a) for a in spec]
    s = spec.strip().lower().replace("+", "_plus").replace("-", "_")
    from pipeline.au_data import AU_SETS
    if s in AU_SETS:
        return list(AU_SETS[s])
    try:
        aus = [int(a) for a in spec.replace(" ", "").split(",") if a]
    except ValueError:
        raise ValueError(f"AU set {spec!r}: give a dataset name ({', '.join(AU_SETS)}) or AU "
                         "numbers separated by commas, e.g. 1,2,4") from None
    if not aus or len(set(aus)) != len(aus) or min(aus) < 1:
        raise ValueError(f"AU set {spec!r}: AU numbers must be distinct positive integers")
    return aus


def released_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The ``model`` state dict of a released checkpoint (and its ``args`` as a dict).

    Weights-only: :func:`pipeline.models.mae.load_checkpoint` (``module.`` prefixes are
    stripped; a pickled Namespace is read as plain attributes; other objects are refused).
    """
    from pipeline.models.mae import load_checkpoint

    ck = load_checkpoint(path)
    return ck["model"], ck["args"]


def vit_config_from_state(state: dict[str, torch.Tensor], where: str) -> dict:
    """The ``model`` metadata (as :mod:`pipeline.au_export`) read off the tensor shapes.

    Width, depth, patch and image size come from the weights; the head count (not in the
    weights) from the ``VIT_SIZES`` entry of that width and depth.
    """
    from pipeline.models.mae import encoder_geometry
    from pipeline.models.vit import VIT_SIZES

    try:
        geo = encoder_geometry(state)
    except ValueError as e:
        raise ValueError(f"{where}: not a ViT checkpoint ({e})") from e
    size = geo["model_size"]
    if size is None:
        raise ValueError(f"{where}: a ViT {geo['embed_dim']} wide and {geo['depth']} blocks "
                         "deep matches no known size "
                         f"{ {n: (s.embed_dim, s.depth) for n, s in VIT_SIZES.items()} }, so "
                         "its number of attention heads is unknown")
    D = geo["embed_dim"]
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / D if fc1 is not None else 4.0
    return {"model_size": size, "embed_dim": D, "depth": geo["depth"],
            "num_heads": VIT_SIZES[size].num_heads, "mlp_ratio": mlp_ratio,
            "img_size": geo["img_size"], "patch_size": geo["patch_size"], "global_pool": "avg",
            "qkv_bias": "blocks.0.attn.qkv.bias" in state, "norm_eps": 1e-6}


def load_released_au_model(path: str | Path, device: str | torch.device = "cpu",
                           aus: str | Sequence[int] | None = None,
                           threshold: float = 0.5) -> tuple[nn.Module, dict]:
    """A released finetuned checkpoint as an :class:`AUModel` in eval mode, with the same
    ``info`` dict as :func:`pipeline.au_export.load_au_model`.

    Args:
        path: the ``.pth`` file (or a safetensors file with the same keys).
        device: where the model goes.
        aus: the AU set of the head (dataset name or numbers); None = inferred from the
            number of outputs (12 = BP4D's order, the only finetuned release).
        threshold: presence threshold (the paper's 0.5).

    Raises:
        ValueError: naming the file and the keys that do not fit (missing, unexpected, wrong
        shape), an unknown ViT size, or an AU set of the wrong length.
    """
    path = Path(path)
    where = str(path)
    state, args = released_state(path)
    dropped = sorted(k for k in state if k.startswith(ID_HEAD_PREFIXES))
    state = {k: v for k, v in state.items() if not k.startswith(ID_HEAD_PREFIXES)}
    if "head.weight" not in state:
        enc_only = "decoder_embed.weight" in state or "norm.weight" in state
        raise ValueError(f"{where}: no AU head (head.weight) in the checkpoint"
                         + ("; it looks like a pretrained FMAE/MAE encoder: set it as "
                            "pretrain.checkpoint and finetune, then predict with the run's "
                            "model.safetensors" if enc_only else ""))
    config = vit_config_from_state(state, where)
    n_out = int(state["head.weight"].shape[0])
    if aus is None:
        if n_out not in AUS_BY_OUTPUTS:
            raise ValueError(f"{where}: the AU head has {n_out} outputs; say which AUs they "
                             "are (predict --aus, e.g. --aus disfa or --aus 1,2,4,...)")
        dataset, au_list = AUS_BY_OUTPUTS[n_out]
        au_list = list(au_list)
        log.info("%s: %d AU outputs, taken as %s's AUs %s", where, n_out, dataset, au_list)
    else:
        au_list = au_set(aus)
        dataset = aus if isinstance(aus, str) and not aus[:1].isdigit() else None
        if len(au_list) != n_out:
            raise ValueError(f"{where}: the AU head has {n_out} outputs but --aus names "
                             f"{len(au_list)} AUs ({au_list})")
    model = build_au_model(config, n_out)
    load_au_weights(model, state, where)
    model.to(device).eval()
    if dropped:
        log.info("%s: identity head dropped (%s)", where, ", ".join(dropped[:4]))
    info = {"format": "released", "aus": au_list, "image_size": config["img_size"],
            "patch_size": config["patch_size"], "model": config,
            "preprocess": default_preprocess(config["img_size"]),
            "thresholds": {"fixed": 0.5, "val_selected": None}, "threshold": float(threshold),
            "dataset": dataset, "fold": None, "variant": "released", "lambda": None,
            "epoch": None, "source": "authors' release", "path": where,
            "args": {k: v for k, v in (args or {}).items()
                     if isinstance(v, (int, float, str, bool)) or v is None}}
    return model, info
