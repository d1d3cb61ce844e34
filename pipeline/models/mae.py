"""FMAE: a masked autoencoder with a timm ViT encoder (paper section 3.1; method.md section 2).

The model follows the MAE reference (He et al., "Masked Autoencoders Are Scalable Vision
Learners", models_mae.py) step by step -- patchify, random_masking, forward_encoder,
forward_decoder, forward_loss -- so released FMAE/MAE checkpoints load without renaming:

- encoder parameters carry timm ``VisionTransformer`` names (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
  ``norm.*``), so :func:`encoder_state_dict` loads straight into a timm ViT;
- decoder parameters carry the reference names (``mask_token``, ``decoder_embed``,
  ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm``, ``decoder_pred``).

Differences from the reference code, on purpose: attention always uses the fused
``torch.nn.functional.scaled_dot_product_attention`` kernel (timm's ``fused_attn``, forced on
here because ``TIMM_FUSED_ATTN=0`` in the environment would silently switch it off); the loss is
computed in fp32 even under autocast; the checkpoint carries a plain-dict model config instead
of a pickled argparse namespace (method.md section 8).
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.io import atomic_torch_save
from pipeline.models.vit import sincos_pos_embed_2d, vit_size

log = logging.getLogger(__name__)

# Keys of MAE.config, in order; they are exactly MAE.__init__'s arguments.
CONFIG_KEYS = ("model_size", "img_size", "patch_size", "decoder_dim", "decoder_depth",
               "decoder_heads", "norm_pix_loss", "mask_ratio")
# Everything in an MAE state dict that is not the encoder.
DECODER_PREFIXES = ("decoder_", "mask_token")


class MAE(nn.Module):
    """Masked autoencoder with a ViT encoder of ``model_size`` and a light ViT decoder.

    Args:
        model_size: encoder size, a key of ``pipeline.models.vit.VIT_SIZES``.
        img_size: side of the square input images in pixels.
        patch_size: side of the square patches; ``img_size`` must be a multiple of it.
        decoder_dim, decoder_depth, decoder_heads: decoder width, blocks and heads
            (reference: 512, 8, 16 for every encoder size).
        norm_pix_loss: regress per-patch normalised pixels (mean 0, var 1 per patch).
        mask_ratio: default share of patches removed when ``forward`` gets none.
    """

    def __init__(self, model_size: str = "tiny", img_size: int = 224, patch_size: int = 16,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 norm_pix_loss: bool = True, mask_ratio: float = 0.75):
        super().__init__()
        # Imported here: timm imports torchvision, which is slow; the module stays cheap to import.
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        s = vit_size(model_size)
        if img_size % patch_size:
            raise ValueError(f"MAE: img_size {img_size} is not a multiple of patch_size "
                             f"{patch_size}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"MAE: decoder_dim {decoder_dim} is not divisible by "
                             f"decoder_heads {decoder_heads}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"MAE: mask_ratio {mask_ratio} must be in [0, 1)")
        self.config: dict[str, Any] = {
            "model_size": str(model_size), "img_size": int(img_size),
            "patch_size": int(patch_size), "decoder_dim": int(decoder_dim),
            "decoder_depth": int(decoder_depth), "decoder_heads": int(decoder_heads),
            "norm_pix_loss": bool(norm_pix_loss), "mask_ratio": float(mask_ratio)}
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        D, Dd = s.embed_dim, decoder_dim

        # ---- encoder (timm VisionTransformer names)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, D)
        num_patches = self.patch_embed.num_patches  # L = grid * grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # Fixed sin-cos embeddings: parameters (so they sit in the state dict under the
        # reference names) that are never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, D), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(D, s.num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(s.depth)])
        self.norm = norm_layer(D)

        # ---- decoder (reference MAE names)
        self.decoder_embed = nn.Linear(D, Dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, Dd),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(Dd, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(Dd)
        self.decoder_pred = nn.Linear(Dd, patch_size * patch_size * 3, bias=True)

        self._force_fused_attention()
        self.initialize_weights()

    # ------------------------------------------------------------------ setup
    def _force_fused_attention(self) -> None:
        """Make every timm Attention use F.scaled_dot_product_attention.

        timm decides ``fused_attn`` per module from the environment at construction
        (``TIMM_FUSED_ATTN``); the explicit q@k^T softmax path it falls back to materialises
        the (N, heads, L, L) attention matrix and is slower and hungrier on every device.
        """
        if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            raise RuntimeError("MAE needs torch.nn.functional.scaled_dot_product_attention "
                               "(torch >= 2.0); upgrade torch")
        n = 0
        for m in self.modules():
            if hasattr(m, "fused_attn") and hasattr(m, "qkv"):
                m.fused_attn = True
                n += 1
        if n != len(self.blocks) + len(self.decoder_blocks):
            raise RuntimeError(f"MAE: found {n} timm attention modules, expected "
                               f"{len(self.blocks) + len(self.decoder_blocks)}; the installed "
                               "timm changed its Attention layout")

    def initialize_weights(self) -> None:
        """MAE initialisation: sin-cos positions, xavier linears, N(0, .02) tokens."""
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(
                sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid))[None])
            self.decoder_pos_embed.copy_(torch.from_numpy(
                sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid))[None])
        # The patch projection is a linear map of a flattened patch: initialise it as one.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    # ------------------------------------------------------------------ steps
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3), patches in row-major order, pixels (p, q, c)."""
        p = self.patch_size
        N, C, H, W = imgs.shape
        if C != 3 or H != W or H % p:
            raise ValueError(f"patchify: expected (N, 3, H, H) with H a multiple of {p}, "
                             f"got {tuple(imgs.shape)}")
        h = w = H // p
        x = imgs.reshape(N, 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(N, h * w, p * p * 3)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*3) -> (N, 3, H, W); the inverse of :meth:`patchify`."""
        p = self.patch_size
        N, L, _ = x.shape
        h = w = int(round(L ** 0.5))
        if h * w != L:
            raise ValueError(f"unpatchify: {L} patches do not form a square grid")
        x = x.reshape(N, h, w, p, p, 3)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(N, 3, h * p, w * p)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by sorting per-patch noise.

        Args:
            x: (N, L, D) patch tokens.
            mask_ratio: share of the L patches to remove.
            noise: optional (N, L) values in [0, 1); the patches with the smallest noise are
                kept. Pass fixed noise for a reproducible mask (reconstruction figures).
        Returns:
            x_masked (N, len_keep, D), mask (N, L) with 0 = keep, 1 = remove (in the original
            patch order), ids_restore (N, L) that undoes the shuffle.
        """
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        elif noise.shape != (N, L):
            raise ValueError(f"random_masking: noise must be {(N, L)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to the original patch order
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float,
                        noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> latent (N, 1 + len_keep, D), mask (N, L), ids_restore (N, L)."""
        x = self.patch_embed(imgs)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + len_keep, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + len_keep, D), ids_restore (N, L) -> pred (N, L, p*p*3)."""
        x = self.decoder_embed(latent)  # (N, 1 + len_keep, Dd)
        N, L = ids_restore.shape
        n_masked = L + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(N, n_masked, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # (N, 1 + L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (N, 1 + L, p*p*3)
        return x[:, 1:, :]  # drop the cls token

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3) regression targets (normalised per patch if set)."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
                     ) -> torch.Tensor:
        """imgs (N, 3, H, W), pred (N, L, p*p*3), mask (N, L) -> scalar MSE on removed patches.

        Computed in fp32 even under autocast: per-patch variance and the mean over few
        masked pixels lose precision in bf16/fp16.
        """
        with torch.autocast(device_type=pred.device.type, enabled=False):
            target = self.patch_targets(imgs)
            loss = (pred.float() - target).pow(2).mean(dim=-1)  # (N, L) per-patch MSE
            # clamp: with mask_ratio 0 no patch is removed and the loss is 0, not NaN.
            return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> (loss scalar, pred (N, L, p*p*3), mask (N, L))."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def mae_from_config(config: dict) -> MAE:
    """Rebuild an :class:`MAE` from ``MAE.config`` (as stored in a checkpoint)."""
    if not isinstance(config, dict):
        raise ValueError(f"MAE config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    missing = sorted(set(CONFIG_KEYS) - set(config))
    if unknown or missing:
        raise ValueError(f"MAE config: unknown keys {unknown}, missing keys {missing}; "
                         f"expected exactly {list(CONFIG_KEYS)}")
    return MAE(**config)


# ---------------------------------------------------------------------- state dicts
def is_decoder_key(key: str) -> bool:
    return key.startswith(DECODER_PREFIXES)


def encoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder part of an MAE state dict (drops ``decoder_*`` and ``mask_token``).

    The result loads into a timm ``VisionTransformer`` of the same size with
    ``strict=True`` (global_pool="token", no head), or, for the finetuning layout
    (global_pool="avg"), with exactly ``fc_norm.*`` missing and ``norm.*`` unexpected.
    """
    return {k: v for k, v in state.items() if not is_decoder_key(k)}


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) wrappers' prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, model: nn.Module | dict[str, torch.Tensor], config: dict,
                    epoch: int) -> None:
    """Write ``{"model": state_dict, "config": config, "epoch": epoch}`` atomically.

    ``model`` is a module (DDP-wrapped or not) or a state dict. Only tensors and plain Python
    types go in, so ``torch.load(weights_only=True)`` reads it.
    """
    if isinstance(model, nn.Module):
        model = getattr(model, "module", model).state_dict()  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in model.items()}
    payload = {"model": state, "config": json.loads(json.dumps(config)), "epoch": int(epoch)}
    atomic_torch_save(path, payload)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely; returns ``{"model": state_dict, "config": dict | None,
    "epoch": int | None, "args": dict | None}``.

    Accepted formats:
    - ours (:func:`save_checkpoint`);
    - the MAE/FMAE reference ``{"model", "optimizer", "epoch", "scaler", "args"}``. Its
      ``args`` is a pickled ``argparse.Namespace``, which ``weights_only=True`` refuses.
      We retry with exactly one extra class allowed, ``argparse.Namespace``: it is a plain
      attribute bag whose construction runs no code, so the loader stays safe (no arbitrary
      globals). ``args`` comes back as a plain dict of its attributes;
    - a bare state dict, and ``.safetensors`` files (config from the metadata key
      ``config`` when present).
    The format is read off the file's first bytes, so a safetensors file loads whatever
    its name.
    Never uses ``weights_only=False``: a file that needs other classes raises an error that
    says how to convert it if you trust it. Files that are no checkpoint (empty, text, a Git
    LFS pointer) or are truncated raise a ValueError naming the file, not torch's or
    safetensors' bare error. The weights are not checked here (see
    :func:`check_finite_weights` and :func:`encoder_geometry`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; check pretrain.checkpoint")
    kind = _file_kind(path)  # the content decides; the suffix only for unknown binaries
    if kind not in ("zip", "pickle", "safetensors", "binary"):
        raise ValueError(f"{path}: not a checkpoint: the file is {kind}. Expected a torch "
                         "checkpoint (.pt/.pth, a zip archive) or a .safetensors file; check "
                         "the path, or re-download the file")
    if kind == "safetensors" or (kind == "binary" and path.suffix == ".safetensors"):
        return _load_safetensors(path)
    if path.suffix == ".safetensors":  # torch.load would read it as safetensors and fail
        raise ValueError(f"{path}: a torch checkpoint ({kind} format) named .safetensors; "
                         "rename it to .pt")
    return _normalise_checkpoint(_torch_load(path), path)


def _file_kind(path: Path) -> str:
    """What the first bytes of ``path`` say it is: zip (torch >= 1.6), pickle (older torch),
    safetensors, binary (anything else, left to torch.load), or a description of a file that
    is certainly no checkpoint (empty, a Git LFS pointer, text)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80"):
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{" and \
            int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (run `git lfs pull`)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    if all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"text (it starts with {first!r})"
    return "binary"


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, allowing ``argparse.Namespace`` only if needed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path}: refusing to unpickle this checkpoint: it contains objects other than "
                f"tensors and plain values ({str(e).splitlines()[0]}). If you trust the file, "
                "convert it once with: python -c \"import torch; c = torch.load('IN', "
                "weights_only=False); torch.save({'model': c['model']}, 'OUT')\" and point "
                "pretrain.checkpoint at OUT") from first
        except Exception as e:  # noqa: BLE001 - see below
            raise _unreadable(path, e) from e
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e}); it "
                      "is truncated or not a checkpoint: re-download or re-create it")


def _normalise_checkpoint(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        state = obj["model"]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj  # a bare state dict
    else:
        raise ValueError(f"{path}: no 'model' state dict inside (top-level keys: "
                         f"{sorted(map(str, obj))[:10]}); expected an MAE/FMAE checkpoint")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: 'model' holds non-tensor entries, e.g. {bad[:3]}")
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    epoch = obj.get("epoch")
    return {"model": _strip_prefixes(state), "config": config,
            "epoch": int(epoch) if isinstance(epoch, int) else None,
            "args": args if isinstance(args, dict) else None}


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ValueError(f"{path}: reading .safetensors needs the 'safetensors' package "
                         "(pip install safetensors), or convert the file to .pt") from None
    state = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                state[k] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - SafetensorError and I/O errors alike
        raise ValueError(f"{path}: not a readable .safetensors file ({e}); it is truncated or "
                         "not safetensors: re-download or re-create it") from e
    config = None
    if "config" in meta:
        try:
            config = json.loads(meta["config"])
        except json.JSONDecodeError:
            log.warning("%s: metadata 'config' is not JSON; ignoring it", path)
        if not isinstance(config, dict):
            config = None
    epoch = int(meta["epoch"]) if str(meta.get("epoch", "")).isdigit() else None
    return {"model": _strip_prefixes(state), "config": config, "epoch": epoch, "args": None}


def check_finite_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse a state dict whose floating-point tensors hold NaN or inf, naming the tensors.

    Such weights load fine and only fail later (a NaN loss in the first finetuning step that
    looks like a learning-rate problem).
    """
    bad = [k for k, v in state.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: {len(bad)} of {len(state)} weight tensors hold NaN or inf "
                         f"(e.g. {bad[:5]}); the checkpoint is corrupt or from a diverged run. "
                         "Use an earlier or re-downloaded checkpoint, or re-run pretraining "
                         "(lower pretrain.blr, or set pretrain.amp to bf16 or off)")


def encoder_geometry(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The encoder's shape, read off a state dict's tensors (not its config).

    Returns:
        ``{"img_size", "patch_size", "embed_dim", "depth", "model_size"}``; ``model_size`` is
        the first ``VIT_SIZES`` entry of that width and depth, or None.
    """
    from pipeline.models.vit import VIT_SIZES

    need = ("patch_embed.proj.weight", "pos_embed", "cls_token")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"state dict lacks encoder keys {missing}; is this a ViT/MAE "
                         "checkpoint with timm names?")
    D, _, p, _ = state["patch_embed.proj.weight"].shape  # (D, 3, p, p)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    L = state["pos_embed"].shape[1] - 1  # (1, 1 + L, D)
    grid = int(round(L ** 0.5))
    if grid * grid != L:
        raise ValueError(f"pos_embed has {L} patch positions, not a square grid")
    sizes = [n for n, s in VIT_SIZES.items() if s.embed_dim == D and s.depth == depth]
    return {"img_size": grid * int(p), "patch_size": int(p), "embed_dim": int(D),
            "depth": depth, "model_size": sizes[0] if sizes else None}


def infer_config(state: dict[str, torch.Tensor], *, decoder_heads: int = 16,
                 norm_pix_loss: bool = True, mask_ratio: float = 0.75) -> dict[str, Any]:
    """An MAE config read off the tensor shapes of a state dict (for reference checkpoints).

    Heads cannot be read off weights: the encoder's come from ``VIT_SIZES``; the decoder's is
    ``decoder_heads``. Without decoder keys the decoder fields describe a default decoder
    (the file then holds an encoder only).
    """
    from pipeline.models.vit import VIT_SIZES

    geo = encoder_geometry(state)
    if geo["model_size"] is None:
        raise ValueError(f"encoder is {geo['embed_dim']} wide and {geo['depth']} deep, which "
                         "matches no size in "
                         f"{ {n: (s.embed_dim, s.depth) for n, s in VIT_SIZES.items()} }")
    if "decoder_embed.weight" in state:
        dd = int(state["decoder_embed.weight"].shape[0])
        ddepth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
    else:
        dd, ddepth = 512, 8
    if dd % decoder_heads:
        raise ValueError(f"decoder width {dd} is not divisible by decoder_heads "
                         f"{decoder_heads}")
    return {"model_size": geo["model_size"], "img_size": geo["img_size"],
            "patch_size": geo["patch_size"], "decoder_dim": dd, "decoder_depth": ddepth,
            "decoder_heads": int(decoder_heads), "norm_pix_loss": bool(norm_pix_loss),
            "mask_ratio": float(mask_ratio)}
