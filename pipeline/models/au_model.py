"""AU detection model with an optional adversarial identity head (FMAE / FMAE-IAT).

Implements the finetuning model of the paper (section 4, "Identity Adversarial Training";
method.md section 3):

- backbone: the pretrained ViT encoder with mean pooling over patch tokens (CLS excluded)
  followed by a fresh LayerNorm ``fc_norm``; the encoder's final ``norm`` is dropped
  (timm ``global_pool="avg", fc_norm=True``);
- AU head: ``Linear(D, n_aus)``, weights trunc-normal with std 2e-5, trained with
  BCE-with-logits over the *known* labels only (-1 = not coded is masked out);
- IAT: the same pooled feature passes a gradient reversal layer (identity forward, gradient
  times ``-lambda`` backward, Ganin & Lempitsky 2015) into an ID head trained with
  cross-entropy over the fold's training subjects. The total loss is ``au_loss + id_loss``:
  the ID head learns identity normally while the backbone receives the *reversed* identity
  gradient, so lambda acts only through the reversal.

``forward`` returns a dict (dinov2 style) so the training loop backpropagates ``out["loss"]``
and logs every other scalar.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Checkpoint keys that belong to the MAE decoder (or the masking token) and have no place in
# the finetuning model.
DECODER_PREFIXES = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.",
                    "decoder_norm.", "decoder_pred.")
# The MAE encoder ends with `norm`; the finetuning layout replaces it by `fc_norm` after pooling.
EXPECTED_UNEXPECTED = frozenset({"norm.weight", "norm.bias"})
EXPECTED_MISSING_ENCODER = frozenset({"fc_norm.weight", "fc_norm.bias"})


class GradReverse(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``-lambda_`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:  # noqa: D102
        ctx.lambda_ = float(lambda_)
        # view_as: a new tensor node (so autograd calls our backward) sharing x's storage.
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        # No gradient for lambda_ (a plain float).
        return grad_output * -ctx.lambda_, None


class GradientReversal(nn.Module):
    """Gradient reversal layer: ``y = x``; ``dL/dx = -lambda_ * dL/dy``.

    Args:
        lambda_: strength of the reversed gradient (paper: BP4D 2.0, BP4D+ 1.0, DISFA 0.5).
    """

    def __init__(self, lambda_: float = 1.0):
        super().__init__()
        if lambda_ < 0:
            raise ValueError(f"GradientReversal: lambda_ must be >= 0, got {lambda_}")
        self.lambda_ = float(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GradReverse.apply(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}"


def _init_small_linear(layer: nn.Linear, std: float) -> nn.Linear:
    nn.init.trunc_normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


def build_id_head(dim: int, n_ids: int, depth: int = 1) -> nn.Module:
    """ID classifier on pooled features (Table 7 ablation).

    Args:
        dim: feature width D.
        n_ids: number of identity classes.
        depth: 1 = ``Linear(D, n_ids)`` (paper default); 2 or 3 = MLP with ``depth - 1``
            hidden layers of width D and GELU.
    """
    if depth not in (1, 2, 3):
        raise ValueError(f"id_head_depth must be 1, 2 or 3, got {depth!r}")
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [_init_small_linear(nn.Linear(dim, dim), 0.02), nn.GELU()]
    # The output layer starts near zero (like the AU head) so the first reversed gradients
    # are small and the initial ID loss is log(n_ids).
    layers.append(_init_small_linear(nn.Linear(dim, n_ids), 2e-5))
    return layers[0] if depth == 1 else nn.Sequential(*layers)


def masked_bce_with_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over known labels only.

    Args:
        logits: (B, A) AU logits.
        labels: (B, A) in {0, 1, -1}; -1 = not coded, excluded from the loss.

    Returns:
        scalar; 0 (still attached to the graph) when a batch has no known label.
    """
    known = labels >= 0  # (B, A) bool
    target = labels.clamp(min=0).to(logits.dtype)
    per_entry = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (B, A)
    return (per_entry * known).sum() / known.sum().clamp(min=1)


class AUModel(nn.Module):
    """ViT backbone + AU head (+ gradient reversal + ID head for IAT).

    Args:
        encoder: timm VisionTransformer built with ``global_pool="avg"`` and ``num_classes=0``
            (see :func:`pipeline.models.vit.build_vit`): ``encoder(x)`` -> (B, D) pooled,
            fc_norm-ed features.
        n_aus: number of AUs (outputs of the AU head).
        n_ids: number of identity classes; 0 = no ID head (plain FMAE finetuning).
        id_head_depth: 1 (linear, paper) or 2/3 (MLP, Table 7).
        lambda_: gradient reversal strength (only used when ``n_ids > 0``).
    """

    def __init__(self, encoder: nn.Module, n_aus: int, n_ids: int = 0, id_head_depth: int = 1,
                 lambda_: float = 0.0):
        super().__init__()
        if getattr(encoder, "global_pool", "avg") != "avg" or not isinstance(
                getattr(encoder, "fc_norm", None), nn.LayerNorm):
            raise ValueError("AUModel needs an encoder built with global_pool='avg' "
                             "(mean-pooled patch tokens + fc_norm); use "
                             "build_vit(..., global_pool='avg')")
        if n_aus < 1:
            raise ValueError(f"AUModel: n_aus must be >= 1, got {n_aus}")
        self.encoder = encoder
        dim = encoder.embed_dim
        self.au_head = _init_small_linear(nn.Linear(dim, n_aus), 2e-5)
        self.n_ids = int(n_ids)
        if self.n_ids > 0:
            self.grl = GradientReversal(lambda_)
            self.id_head = build_id_head(dim, self.n_ids, id_head_depth)
        else:
            self.grl = None
            self.id_head = None

    @property
    def num_layers(self) -> int:
        return len(self.encoder.blocks)

    def forward(self, x: torch.Tensor, au_labels: torch.Tensor | None = None,
                ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run the model; add losses when labels are given.

        Args:
            x: (B, 3, H, W) normalised images.
            au_labels: (B, A) in {0, 1, -1} or None.
            ids: (B,) identity class indices in [0, n_ids) or None.

        Returns:
            ``features`` (B, D), ``au_logits`` (B, A), ``id_logits`` (B, n_ids) with an ID
            head; with ``au_labels`` also ``au_loss`` and ``loss``; with an ID head and
            ``ids`` also ``id_loss`` and ``id_acc`` (the ID head's training accuracy).
        """
        feats = self.encoder(x)  # (B, D)
        out: dict[str, Any] = {"features": feats, "au_logits": self.au_head(feats)}  # (B, A)
        if self.id_head is not None:
            out["id_logits"] = self.id_head(self.grl(feats))  # (B, n_ids)
        if au_labels is None:
            return out
        # Losses in fp32 even under autocast: BCE over tiny logits is precision sensitive.
        au_loss = masked_bce_with_logits(out["au_logits"].float(), au_labels)
        out["au_loss"] = au_loss
        loss = au_loss
        if self.id_head is not None and ids is not None:
            id_logits = out["id_logits"].float()
            id_loss = F.cross_entropy(id_logits, ids)
            out["id_loss"] = id_loss
            out["id_acc"] = (id_logits.argmax(dim=1) == ids).float().mean()
            # Plain sum: the reversal layer already carries lambda (paper eq. 3).
            loss = loss + id_loss
        out["loss"] = loss
        return out


def load_pretrained_encoder(model: AUModel, state_dict: dict[str, torch.Tensor]
                            ) -> tuple[list[str], list[str]]:
    """Load an MAE/FMAE pretraining state dict into ``model.encoder`` (strictly checked).

    Decoder and ``mask_token`` keys are dropped. Nothing is interpolated: every remaining
    key must exist in the encoder with the same shape, the only encoder keys left without a
    value must be ``fc_norm.weight/bias`` (new, as in the MAE finetuning reference) and the
    only unused checkpoint keys ``norm.weight/bias`` (the encoder's final norm, replaced by
    fc_norm).

    Args:
        model: the AU model whose encoder receives the weights.
        state_dict: checkpoint ``"model"`` entry with timm VisionTransformer encoder names.

    Returns:
        (missing, unexpected): missing keys named as in ``model`` (``encoder.fc_norm.*`` and
        the head keys ``au_head.*``/``id_head.*``), unexpected keys named as in the
        checkpoint (``norm.weight``, ``norm.bias``).

    Raises:
        ValueError: naming the keys when the checkpoint does not fit the encoder.
    """
    enc_state = {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}
    target = model.encoder.state_dict()
    mismatched = [k for k, v in enc_state.items() if k in target and tuple(v.shape) != tuple(
        target[k].shape)]
    if "pos_embed" in mismatched:
        raise ValueError(
            f"pretrained pos_embed has shape {tuple(enc_state['pos_embed'].shape)} but the "
            f"finetuning encoder expects {tuple(target['pos_embed'].shape)}: the image size (or "
            "patch size) differs from pretraining. Set finetune.image_size = "
            "pretrain.image_size (and the same patch size); position embeddings are not "
            "interpolated")
    if mismatched:
        detail = ", ".join(f"{k} {tuple(enc_state[k].shape)} vs {tuple(target[k].shape)}"
                           for k in mismatched[:8])
        raise ValueError(f"pretrained weights do not fit the encoder (checkpoint vs model): "
                         f"{detail}. Check model_size and pretrain.patch_size against the "
                         "checkpoint's config")
    missing = set(target) - set(enc_state)
    unexpected = set(enc_state) - set(target)
    if missing != EXPECTED_MISSING_ENCODER or unexpected != EXPECTED_UNEXPECTED:
        raise ValueError(
            "pretrained checkpoint keys do not match the encoder: expected missing "
            f"{sorted(EXPECTED_MISSING_ENCODER)} and unexpected {sorted(EXPECTED_UNEXPECTED)}, "
            f"got missing {sorted(missing)[:10]} and unexpected {sorted(unexpected)[:10]}. "
            "Is this an MAE/FMAE pretraining checkpoint of the same model size?")
    model.encoder.load_state_dict({k: v for k, v in enc_state.items() if k in target},
                                  strict=False)
    head_keys = [k for k in model.state_dict() if not k.startswith("encoder.")]
    missing_named = sorted([f"encoder.{k}" for k in missing] + head_keys)
    log.info("loaded %d pretrained encoder tensors; new: %s; unused: %s",
             len(enc_state) - len(unexpected), missing_named, sorted(unexpected))
    return missing_named, sorted(unexpected)
