"""AU detection model with an optional adversarial identity head (FMAE / FMAE-IAT).

Implements the finetuning model of the paper (section 4, "Identity Adversarial Training";
method.md section 3):

- backbone: the pretrained ViT encoder with mean pooling over patch tokens (CLS excluded)
  followed by a fresh LayerNorm ``fc_norm``; the encoder's final ``norm`` is dropped
  (timm ``global_pool="avg", fc_norm=True``);
- AU head: ``Linear(D, n_aus)``, weights trunc-normal with std 2e-5 and PyTorch's default
  bias (the reference re-initialises only the weight), trained with BCE-with-logits over the
  *known* labels only (-1 = not coded is masked out);
- IAT: the same pooled feature passes a gradient reversal layer (identity forward, gradient
  times ``-lambda`` backward, Ganin & Lempitsky 2015) into an ID head. The total loss is
  ``au_loss + id_loss``: the ID head learns identity normally while the backbone receives the
  *reversed* identity gradient, so lambda acts only through the reversal.

The identity branch follows the authors' code by default (method.md section 3):

- ``id_loss="bce"``: BCE-with-logits on one-hot targets, averaged over batch x classes, with
  one class per subject of the *whole dataset* (test subjects' classes only ever see the
  target 0). ``"ce"`` is softmax cross-entropy (what the paper's text says);
- ``id_head_init="default"``: PyTorch's ``nn.Linear`` initialisation; ``"small"`` starts the
  ID head's output layer at trunc-normal std 2e-5 like the AU head, which sends 100x less
  reversed gradient at step 0, so lambda values are not comparable with the paper's;
  ``"prior"`` keeps the default weights and starts the output bias at the class prior
  (sigmoid(b) = 1/N). With one-hot BCE the reference's head must first learn that prior
  through its bias, which AdamW moves by about lr per step and the reversed gradient cannot
  undo; on BP4D it gets there over its long schedule (the paper's linear head ends at an ID
  loss of 0.152, Table 7), on a ~1000-step CPU run it stays near logit 0 (loss ~0.7) and the
  backbone receives a reversed gradient that is mostly this prior error, not identity.

The AU head's bias can start at each AU's training base rate instead
(:func:`init_au_head_prior`, ``finetune.au_head_init: prior``, the CPU default) for the same
reason: AdamW moves the bias by about lr per step, so the reference's head spends its first
epochs learning the base rates (logit ~-1.4 for 20% positives) while the backbone is pushed
to add one shared offset to every frame's features; ~1000 CPU steps end before that is done.

The MLP ID heads of Table 7 follow the authors' ablation branch: hidden widths D/2 (and D/4)
with GELU.

``forward`` returns a dict (dinov2 style) so the training loop backpropagates ``out["loss"]``
and logs every other scalar.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

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


ID_LOSSES = ("bce", "ce")
ID_HEAD_INITS = ("default", "small", "prior")


def build_id_head(dim: int, n_ids: int, depth: int = 1, init: str = "default") -> nn.Module:
    """ID classifier on pooled features (Table 7 ablation).

    Args:
        dim: feature width D.
        n_ids: number of identity classes.
        depth: 1 = ``Linear(D, n_ids)`` (paper default); 2 = ``D -> D/2 -> n_ids``;
            3 = ``D -> D/2 -> D/4 -> n_ids`` (GELU between layers, as the authors' ablation).
        init: ``default`` (PyTorch's nn.Linear init, the reference); ``small`` (output
            layer trunc-normal std 2e-5, bias 0); ``prior`` (default weights, output bias
            ``log(1 / (n_ids - 1))`` so every one-hot BCE logit starts at the class prior
            1 / n_ids, which the reference's head only reaches after many thousand steps).
    """
    if depth not in (1, 2, 3):
        raise ValueError(f"id_head_depth must be 1, 2 or 3, got {depth!r}")
    if init not in ID_HEAD_INITS:
        raise ValueError(f"id_head_init must be one of {ID_HEAD_INITS}, got {init!r}")
    widths = [dim, dim // 2, dim // 4][:depth] + [n_ids]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < depth - 1:
            layers.append(nn.GELU())
    if init == "small":
        nn.init.trunc_normal_(layers[-1].weight, std=2e-5)
        nn.init.zeros_(layers[-1].bias)
    elif init == "prior":
        nn.init.constant_(layers[-1].bias, -math.log(max(n_ids - 1, 1)))
    return layers[0] if depth == 1 else nn.Sequential(*layers)


def init_au_head_prior(head: nn.Linear, rates: Sequence[float | None]) -> None:
    """Set the AU head's output bias to the log-odds of each AU's training base rate.

    Args:
        head: ``Linear(D, A)``, the AU head.
        rates: (A,) positive rate of each AU over the training labels it is trained on;
            ``None`` (never coded) keeps that AU's bias. Rates are clipped to [1e-3, 1 - 1e-3]
            so an AU that never (or always) occurs gets a finite bias.
    """
    if len(rates) != head.out_features:
        raise ValueError(f"init_au_head_prior: {len(rates)} rates for {head.out_features} AUs")
    with torch.no_grad():
        for j, r in enumerate(rates):
            if r is not None:
                p = min(max(float(r), 1e-3), 1.0 - 1e-3)
                head.bias[j] = math.log(p / (1.0 - p))


def identity_loss(logits: torch.Tensor, ids: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Identity loss of the ID head.

    Args:
        logits: (B, C) ID logits, one class per identity.
        ids: (B,) class indices in [0, C).
        kind: ``bce`` = mean over B x C of BCE-with-logits against one-hot targets (the
            authors' code); ``ce`` = softmax cross-entropy (the paper's text).

    Returns:
        scalar loss.
    """
    if kind == "bce":
        target = F.one_hot(ids, logits.shape[1]).to(logits.dtype)  # (B, C)
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "ce":
        return F.cross_entropy(logits, ids)
    raise ValueError(f"id_loss must be one of {ID_LOSSES}, got {kind!r}")


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
        id_loss: ``bce`` (reference: one-hot BCE) or ``ce`` (cross-entropy).
        id_head_init: ``default`` (reference) or ``small``.
    """

    def __init__(self, encoder: nn.Module, n_aus: int, n_ids: int = 0, id_head_depth: int = 1,
                 lambda_: float = 0.0, id_loss: str = "bce", id_head_init: str = "default"):
        super().__init__()
        if getattr(encoder, "global_pool", "avg") != "avg" or not isinstance(
                getattr(encoder, "fc_norm", None), nn.LayerNorm):
            raise ValueError("AUModel needs an encoder built with global_pool='avg' "
                             "(mean-pooled patch tokens + fc_norm); use "
                             "build_vit(..., global_pool='avg')")
        if n_aus < 1:
            raise ValueError(f"AUModel: n_aus must be >= 1, got {n_aus}")
        if id_loss not in ID_LOSSES:
            raise ValueError(f"AUModel: id_loss must be one of {ID_LOSSES}, got {id_loss!r}")
        self.encoder = encoder
        dim = encoder.embed_dim
        self.au_head = nn.Linear(dim, n_aus)
        nn.init.trunc_normal_(self.au_head.weight, std=2e-5)  # bias: nn.Linear's default
        self.n_ids = int(n_ids)
        self.id_loss = id_loss
        if self.n_ids > 0:
            self.grl = GradientReversal(lambda_)
            self.id_head = build_id_head(dim, self.n_ids, id_head_depth, id_head_init)
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
            id_loss = identity_loss(id_logits, ids, self.id_loss)
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
