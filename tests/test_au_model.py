"""AU model: gradient reversal, lambda = 0 equivalence, gradients, pretrained loading."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.models import vit
from pipeline.models.au_model import (AUModel, GradientReversal, GradReverse, build_id_head,
                                      init_au_head_prior,
                                      identity_loss, load_pretrained_encoder,
                                      masked_bce_with_logits)

TINY = vit.ViTSize(embed_dim=32, depth=2, num_heads=2, patch_size=8)


@pytest.fixture(autouse=True)
def tiny_vit(monkeypatch):
    monkeypatch.setitem(vit.VIT_SIZES, "tiny", TINY)


def _encoder(img: int = 16, drop_path: float = 0.0):
    torch.manual_seed(0)
    return vit.build_vit("tiny", img, 8, drop_path, global_pool="avg")


def _batch(n: int = 6, n_aus: int = 3, n_ids: int = 4, img: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, img, img, generator=g)
    labels = torch.randint(-1, 2, (n, n_aus), generator=g)  # includes -1 = unknown
    ids = torch.randint(0, n_ids, (n,), generator=g)
    return x, labels, ids


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_reversal_is_identity_forward_and_minus_lambda_backward(lam):
    x = torch.randn(5, 7, requires_grad=True)
    upstream = torch.randn(5, 7)
    y = GradientReversal(lam)(x)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream * -lam)
    # The Function itself, without the module.
    x2 = x.detach().clone().requires_grad_(True)
    GradReverse.apply(x2, lam).sum().backward()
    assert torch.equal(x2.grad, torch.full_like(x2, -lam))


def test_negative_lambda_rejected():
    with pytest.raises(ValueError, match="lambda_"):
        GradientReversal(-1.0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.grad is not None}


def test_lambda_zero_equals_plain_model():
    enc = _encoder()
    plain = AUModel(copy.deepcopy(enc), n_aus=3)
    iat = AUModel(copy.deepcopy(enc), n_aus=3, n_ids=4, lambda_=0.0)
    iat.au_head.load_state_dict(plain.au_head.state_dict())
    x, labels, ids = _batch()
    out_p = plain(x, labels)
    out_i = iat(x, labels, ids)
    assert torch.equal(out_p["au_logits"], out_i["au_logits"])
    assert torch.equal(out_p["au_loss"], out_i["au_loss"])
    assert out_i["id_loss"] > 0 and "id_loss" not in out_p
    out_p["loss"].backward()
    out_i["loss"].backward()
    gp, gi = _grads(plain), _grads(iat)
    assert gp.keys() == gi.keys() and gp
    for name in gp:
        assert torch.equal(gp[name], gi[name]), name
    # The ID head itself still learns when lambda = 0.
    assert iat.id_head.weight.grad.abs().sum() > 0


def test_positive_lambda_changes_backbone_gradient():
    enc = _encoder()
    plain = AUModel(copy.deepcopy(enc), n_aus=3)
    iat = AUModel(copy.deepcopy(enc), n_aus=3, n_ids=4, lambda_=1.0)
    iat.au_head.load_state_dict(plain.au_head.state_dict())
    # A visible ID head so the reversed gradient is not negligible next to the AU one.
    torch.nn.init.normal_(iat.id_head.weight, std=1.0)
    x, labels, ids = _batch()
    plain(x, labels)["loss"].backward()
    iat(x, labels, ids)["loss"].backward()
    w = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(_grads(plain)[w], _grads(iat)[w])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_every_parameter_gets_a_gradient(depth):
    model = AUModel(_encoder(drop_path=0.1), n_aus=3, n_ids=4, id_head_depth=depth, lambda_=1.0)
    linears = [m for m in model.id_head.modules() if isinstance(m, torch.nn.Linear)]
    # The authors' ablation heads: D -> D/2 (-> D/4) -> n_ids, GELU between.
    assert [(m.in_features, m.out_features) for m in linears] == \
        [(32, 4)] if depth == 1 else ([(32, 16), (16, 4)] if depth == 2
                                     else [(32, 16), (16, 8), (8, 4)])
    x, labels, ids = _batch()
    labels[0] = 1  # at least one known label per AU
    out = model(x, labels, ids)
    assert set(out) >= {"loss", "au_loss", "id_loss", "id_acc", "au_logits", "id_logits",
                        "features"}
    assert out["id_logits"].shape == (6, 4) and out["features"].shape == (6, 32)
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name == "encoder.pos_embed"  # fixed sin-cos


def test_masked_bce_ignores_unknown_labels():
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.7]])
    labels = torch.tensor([[1, -1, 0], [0, 1, -1]])
    known = labels >= 0
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[known], labels[known].float())
    assert torch.allclose(masked_bce_with_logits(logits, labels), ref)
    changed = logits.clone()
    changed[~known] = 50.0
    assert torch.allclose(masked_bce_with_logits(changed, labels), ref)
    # All unknown: zero loss, no NaN.
    assert masked_bce_with_logits(logits, torch.full_like(labels, -1)).item() == 0.0


def _mae_state(img: int = 16) -> dict:
    torch.manual_seed(3)
    enc = vit.build_vit("tiny", img, 8, global_pool="token")
    state = dict(enc.state_dict())
    d = 16
    state.update({"mask_token": torch.zeros(1, 1, d), "decoder_embed.weight": torch.zeros(d, 32),
                  "decoder_embed.bias": torch.zeros(d),
                  "decoder_pos_embed": torch.zeros(1, (img // 8) ** 2 + 1, d),
                  "decoder_blocks.0.norm1.weight": torch.ones(d),
                  "decoder_norm.weight": torch.ones(d), "decoder_norm.bias": torch.zeros(d),
                  "decoder_pred.weight": torch.zeros(8 * 8 * 3, d),
                  "decoder_pred.bias": torch.zeros(8 * 8 * 3)})
    return state


def test_load_pretrained_reports_expected_keys_and_copies_weights():
    state = _mae_state()
    model = AUModel(_encoder(), n_aus=3, n_ids=5, id_head_depth=2, lambda_=1.0)
    missing, unexpected = load_pretrained_encoder(model, state)
    head_keys = {k for k in model.state_dict() if k.startswith(("au_head.", "id_head."))}
    assert set(missing) == {"encoder.fc_norm.weight", "encoder.fc_norm.bias"} | head_keys
    assert len(head_keys) == 6  # au_head w/b + two id_head Linear layers w/b
    assert set(unexpected) == {"norm.weight", "norm.bias"}
    enc_state = model.encoder.state_dict()
    for k in ("patch_embed.proj.weight", "cls_token", "blocks.1.mlp.fc2.weight", "pos_embed"):
        assert torch.equal(enc_state[k], state[k]), k


def test_load_pretrained_rejects_other_image_size():
    model = AUModel(_encoder(img=16), n_aus=3)
    with pytest.raises(ValueError, match="finetune.image_size = pretrain.image_size"):
        load_pretrained_encoder(model, _mae_state(img=32))


@pytest.mark.parametrize("edit", ["extra", "drop"])
def test_load_pretrained_names_wrong_keys(edit):
    state = _mae_state()
    if edit == "extra":
        state["head.weight"] = torch.zeros(10, 32)
        needle = "head.weight"
    else:
        del state["blocks.1.attn.proj.bias"]
        needle = "blocks.1.attn.proj.bias"
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        load_pretrained_encoder(AUModel(_encoder(), n_aus=3), state)


def test_encoder_without_avg_pool_rejected():
    enc = vit.build_vit("tiny", 16, 8, global_pool="token")
    with pytest.raises(ValueError, match="global_pool='avg'"):
        AUModel(enc, n_aus=3)


# --------------------------------------------------------------------------- identity branch
# A 3-subject toy worked by hand: logits z with sigmoid(z) in {0.25, 0.5, 0.75}.
LN3 = float(torch.log(torch.tensor(3.0)))
TOY_Z = torch.tensor([[0.0, LN3, -LN3], [LN3, 0.0, 0.0]])
TOY_IDS = torch.tensor([0, 2])


def test_bce_one_hot_identity_loss_and_gradient_by_hand():
    z = TOY_Z.clone().requires_grad_(True)
    loss = identity_loss(z, TOY_IDS, "bce")
    # Per element softplus(z) - y*z. Row 0 (target [1,0,0]): ln2, ln4, ln(4/3);
    # row 1 (target [0,0,1]): ln4, ln2, ln2. Mean over batch x classes = (9 ln2 - ln3) / 6.
    ln2 = float(torch.log(torch.tensor(2.0)))
    assert loss.item() == pytest.approx((9 * ln2 - LN3) / 6, abs=1e-6)
    loss.backward()
    # d/dz = (sigmoid(z) - y) / (B * C)
    want = torch.tensor([[0.5 - 1, 0.75, 0.25], [0.75, 0.5, 0.5 - 1]]) / 6
    assert torch.allclose(z.grad, want, atol=1e-6)


def test_cross_entropy_option_by_hand():
    z = TOY_Z.clone().requires_grad_(True)
    loss = identity_loss(z, TOY_IDS, "ce")
    # Row 0: exp = [1, 3, 1/3] -> -log(1 / (13/3)) = log(13/3); row 1: [3, 1, 1] -> log 5.
    want = (torch.log(torch.tensor(13 / 3)) + torch.log(torch.tensor(5.0))) / 2
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    with pytest.raises(ValueError, match="id_loss"):
        identity_loss(z, TOY_IDS, "focal")


def test_reversed_gradient_reaching_the_features_is_minus_lambda_g_w():
    """Features -> GRL(lambda) -> linear ID head W (no bias): dL/df = -lambda (dL/dz) W."""
    lam = 2.0
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
    feats = torch.tensor([[0.5, -1.0], [2.0, 0.0]], requires_grad=True)
    z = head(GradientReversal(lam)(feats))
    identity_loss(z, TOY_IDS, "bce").backward()
    g = (torch.sigmoid(z.detach()) - torch.nn.functional.one_hot(TOY_IDS, 3)) / 6  # (2, 3)
    assert torch.allclose(feats.grad, -lam * g @ head.weight.detach(), atol=1e-6)


def test_id_head_init_default_is_pytorch_linear_and_small_is_tiny():
    torch.manual_seed(3)
    default = build_id_head(64, 5, 1, "default")
    torch.manual_seed(3)
    ref = torch.nn.Linear(64, 5)
    assert torch.equal(default.weight, ref.weight) and torch.equal(default.bias, ref.bias)
    small = build_id_head(64, 5, 1, "small")
    assert small.weight.abs().max() < 1e-4 and small.bias.abs().max() == 0
    with pytest.raises(ValueError, match="id_head_init"):
        build_id_head(64, 5, 1, "zeros")


def test_prior_init_is_default_weights_with_the_bias_at_the_class_prior():
    torch.manual_seed(3)
    prior = build_id_head(64, 5, 1, "prior")
    torch.manual_seed(3)
    ref = torch.nn.Linear(64, 5)
    assert torch.equal(prior.weight, ref.weight)
    assert torch.allclose(prior.bias, torch.full((5,), -math.log(4)))
    assert torch.allclose(torch.sigmoid(prior.bias), torch.full((5,), 1 / 5))  # the prior 1/N
    # with zero features every one-hot BCE term is at the prior's value: (ln 5 + 4 ln 5/4) / 5
    loss = identity_loss(prior(torch.zeros(2, 64)), torch.tensor([0, 3]), "bce")
    assert loss.item() == pytest.approx((math.log(5) + 4 * math.log(5 / 4)) / 5, rel=1e-6)
    mlp = build_id_head(64, 5, 3, "prior")
    assert torch.allclose(mlp[-1].bias, torch.full((5,), -math.log(4)))


def test_default_init_sends_far_more_reversed_gradient_than_small_init():
    """The reference's default-initialised ID head is what makes lambda mean the paper's lambda."""
    x, labels, ids = _batch()
    norms = {}
    for init in ("default", "small"):
        model = AUModel(_encoder(), n_aus=3, n_ids=4, lambda_=1.0, id_head_init=init)
        out = model(x, labels, ids)
        # the gradient the backbone receives from the ID branch (through the reversal layer)
        (grad,) = torch.autograd.grad(out["id_loss"], out["features"])
        norms[init] = grad.norm().item()
    assert norms["default"] > 100 * norms["small"] > 0


def test_au_head_matches_the_reference_init():
    torch.manual_seed(0)
    model = AUModel(_encoder(), n_aus=3)
    w, b = model.au_head.weight, model.au_head.bias
    assert w.abs().max() < 1e-4  # trunc-normal std 2e-5
    bound = 1 / (32 ** 0.5)  # nn.Linear's default bias: U(-1/sqrt(D), 1/sqrt(D))
    assert b.abs().max() <= bound and b.abs().max() > 1e-3


def test_au_prior_init_sets_each_bias_to_the_log_odds_of_its_base_rate():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 4)
    nn_default = head.bias[3].item()
    init_au_head_prior(head, [0.2, 0.5, 0.0, None])
    # log(0.2 / 0.8) = -ln 4; 0.5 -> 0; a rate of 0 is clipped to 1e-3; None keeps the bias
    assert head.bias[0].item() == pytest.approx(-math.log(4), rel=1e-6)
    assert head.bias[1].item() == pytest.approx(0.0, abs=1e-7)
    assert head.bias[2].item() == pytest.approx(math.log(1e-3 / (1 - 1e-3)), rel=1e-5)
    assert head.bias[3].item() == nn_default
    # with zero features the BCE of a 20%-positive AU is then the entropy of its base rate
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        head(torch.zeros(5, 8))[:, 0], y)
    assert loss.item() == pytest.approx(-(0.2 * math.log(0.2) + 0.8 * math.log(0.8)), rel=1e-5)
    with pytest.raises(ValueError, match="3 rates for 4 AUs"):
        init_au_head_prior(head, [0.1, 0.2, 0.3])
