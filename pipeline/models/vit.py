"""ViT encoder sizes and the timm builder shared by pretraining and finetuning.

Sizes follow the MAE/FMAE reference (method.md section 2); ``tiny`` is timm's ViT-Ti, used by
the CPU default. All sizes: qkv_bias=True, LayerNorm eps 1e-6, mlp_ratio 4, fixed 2D sin-cos
position embeddings. Parameter names are timm's ``VisionTransformer`` names, which are the
names in the released MAE/FMAE checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int  # the reference patch size for this size


VIT_SIZES: dict[str, ViTSize] = {
    "mini": ViTSize(128, 6, 2, 16),   # not in the paper: the CPU demo's size (1.8M params)
    "tiny": ViTSize(192, 12, 3, 16),
    "small": ViTSize(384, 12, 6, 16),
    "base": ViTSize(768, 12, 12, 16),
    "large": ViTSize(1024, 24, 16, 16),
    "huge": ViTSize(1280, 32, 16, 14),
}


def vit_size(name: str) -> ViTSize:
    try:
        return VIT_SIZES[name]
    except KeyError:
        raise ValueError(f"model_size {name!r} unknown; choose one of "
                         f"{', '.join(VIT_SIZES)}") from None


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2D sin-cos position embedding, as in MAE.

    Returns (grid_size*grid_size [+1], embed_dim); the optional first row (cls) is zeros.
    Half the channels encode the row (h) coordinate and half the column (w) coordinate, each
    with sin and cos over geometric frequencies 1/10000^(2i/d).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for 2D sin-cos")
    # MAE convention (meshgrid(w, h)): the first half of the channels encodes the coordinate
    # that varies along a row, the second half the one that varies down a column.
    along_row, down_col = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                                      np.arange(grid_size, dtype=np.float64), indexing="xy")

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, d)

    emb = np.concatenate([one_axis(embed_dim // 2, along_row), one_axis(embed_dim // 2, down_col)],
                         axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb.astype(np.float32)


def build_vit(model_size: str, img_size: int, patch_size: int | None = None,
              drop_path_rate: float = 0.0, global_pool: str = "token",
              num_classes: int = 0) -> nn.Module:
    """A timm VisionTransformer of the given size with fixed sin-cos position embeddings.

    ``global_pool="avg"`` gives the finetuning layout (mean of patch tokens, then ``fc_norm``,
    no final ``norm``); ``"token"`` gives the MAE encoder layout (final ``norm``).
    """
    from timm.models.vision_transformer import VisionTransformer

    s = vit_size(model_size)
    p = patch_size or s.patch_size
    if img_size % p:
        raise ValueError(f"image size {img_size} is not a multiple of patch size {p}")
    model = VisionTransformer(
        img_size=img_size, patch_size=p, embed_dim=s.embed_dim, depth=s.depth,
        num_heads=s.num_heads, mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=num_classes,
        global_pool=global_pool, fc_norm=(global_pool == "avg"), drop_path_rate=drop_path_rate)
    grid = img_size // p
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(s.embed_dim, grid))[None])
    model.pos_embed.requires_grad_(False)
    return model
