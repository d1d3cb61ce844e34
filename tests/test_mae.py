"""MAE model (pipeline/models/mae.py): steps, loss, fused attention, key compatibility,
checkpoint formats."""
from __future__ import annotations

import argparse
import collections

import pytest
import torch

from pipeline.models.mae import (MAE, encoder_state_dict, infer_config, load_checkpoint,
                                 mae_from_config, save_checkpoint)
from pipeline.models.vit import VIT_SIZES, build_vit, sincos_pos_embed_2d

IMG, PATCH, DEC, DEC_DEPTH, DEC_HEADS = 32, 8, 32, 1, 2
L = (IMG // PATCH) ** 2


@pytest.fixture(scope="module")
def mae() -> MAE:
    torch.manual_seed(0)
    return MAE("tiny", img_size=IMG, patch_size=PATCH, decoder_dim=DEC,
               decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS)


def reference_keys(size: str, depth: int, dec_depth: int) -> set[str]:
    """State-dict names of the MAE reference (models_mae.py) / timm ViT, written out."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
             "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "mask_token", "decoder_pos_embed",
            "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{b}" for i in range(depth) for b in block}
    keys |= {f"decoder_blocks.{i}.{b}" for i in range(dec_depth) for b in block}
    return keys


def test_patchify_roundtrip_and_layout(mae):
    imgs = torch.randn(2, 3, IMG, IMG)
    x = mae.patchify(imgs)
    assert x.shape == (2, L, PATCH * PATCH * 3)
    assert torch.equal(mae.unpatchify(x), imgs)
    # Patch 1 is the second patch of the first row, pixels ordered (row, col, channel).
    assert torch.equal(x[0, 1].view(PATCH, PATCH, 3), imgs[0, :, :PATCH, PATCH:2 * PATCH]
                       .permute(1, 2, 0))


def test_random_masking_keeps_smallest_noise(mae):
    x = torch.randn(3, L, 5)
    noise = torch.rand(3, L)
    x_masked, mask, ids_restore = mae.random_masking(x, 0.75, noise)
    keep = int(L * 0.25)
    assert x_masked.shape == (3, keep, 5)
    assert torch.equal(mask.sum(1), torch.full((3,), float(L - keep)))
    for n in range(3):
        kept = torch.argsort(noise[n])[:keep]
        assert torch.equal(x_masked[n], x[n, kept])  # kept in order of increasing noise
        assert set(torch.nonzero(mask[n] == 0).flatten().tolist()) == set(kept.tolist())
        # ids_restore undoes the shuffle
        assert torch.equal(torch.argsort(noise[n])[ids_restore[n]], torch.arange(L))


def test_forward_shapes_and_loss_on_masked_patches_only(mae):
    torch.manual_seed(1)
    imgs = torch.randn(2, 3, IMG, IMG)
    loss, pred, mask = mae(imgs)
    assert pred.shape == (2, L, PATCH * PATCH * 3) and mask.shape == (2, L)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Changing predictions of visible patches must not change the loss; masked ones must.
    pred2 = pred.detach().clone()
    pred2[mask == 0] += 10.0
    assert torch.allclose(mae.forward_loss(imgs, pred2, mask), loss.detach())
    pred3 = pred.detach().clone()
    pred3[mask == 1] += 10.0
    assert mae.forward_loss(imgs, pred3, mask) > loss.detach() + 1.0


def test_norm_pix_targets_are_normalised_per_patch(mae):
    imgs = torch.rand(2, 3, IMG, IMG) * 5 + 3
    t = mae.patch_targets(imgs)
    assert torch.allclose(t.mean(-1), torch.zeros(2, L), atol=1e-4)
    assert torch.allclose(t.var(-1), torch.ones(2, L), atol=1e-3)
    # Predicting the normalised target exactly gives zero loss.
    mask = torch.ones(2, L)
    assert mae.forward_loss(imgs, t, mask).item() < 1e-10


def test_every_trainable_parameter_gets_a_gradient(mae):
    mae.zero_grad(set_to_none=True)
    loss, _, _ = mae(torch.randn(2, 3, IMG, IMG))
    loss.backward()
    frozen = {n for n, p in mae.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "decoder_pos_embed"}
    no_grad = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    mae.zero_grad(set_to_none=True)


def test_fused_attention_is_used_even_when_timm_disables_it(monkeypatch):
    import timm.layers.config as timm_config

    monkeypatch.setattr(timm_config, "_USE_FUSED_ATTN", 0)  # as TIMM_FUSED_ATTN=0 would
    model = MAE("tiny", img_size=IMG, patch_size=PATCH, decoder_dim=DEC,
                decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS)
    calls = collections.Counter()
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls["sdpa"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model(torch.randn(1, 3, IMG, IMG))
    assert calls["sdpa"] == VIT_SIZES["tiny"].depth + DEC_DEPTH


def test_state_dict_names_are_the_reference_names(mae):
    assert set(mae.state_dict()) == reference_keys("tiny", VIT_SIZES["tiny"].depth, DEC_DEPTH)


def test_reference_named_state_dict_loads_into_mae(mae):
    # A checkpoint with the reference names (random values, right shapes) loads strictly.
    shapes = {k: v.shape for k, v in mae.state_dict().items()}
    ref = {k: torch.randn(shapes[k]) for k in reference_keys("tiny", 12, DEC_DEPTH)}
    fresh = MAE("tiny", img_size=IMG, patch_size=PATCH, decoder_dim=DEC,
                decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS)
    fresh.load_state_dict(ref, strict=True)
    assert torch.equal(fresh.decoder_pred.weight, ref["decoder_pred.weight"])


def test_encoder_keys_load_into_timm_vit(mae):
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    s = VIT_SIZES["tiny"]
    enc = encoder_state_dict(mae.state_dict())
    assert not any(k.startswith("decoder_") or k == "mask_token" for k in enc)
    vit = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=s.embed_dim,
                            depth=s.depth, num_heads=s.num_heads, qkv_bias=True,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0)
    vit.load_state_dict(enc, strict=True)
    # The finetuning layout (mean pooling + fc_norm) misses exactly fc_norm, drops norm.
    ft = build_vit("tiny", IMG, PATCH, global_pool="avg")
    res = ft.load_state_dict(enc, strict=False)
    assert set(res.missing_keys) == {"fc_norm.weight", "fc_norm.bias"}
    assert set(res.unexpected_keys) == {"norm.weight", "norm.bias"}
    # Same features as the MAE encoder with nothing masked.
    vit.eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        latent, _, _ = mae.forward_encoder(x, 0.0, noise=torch.arange(L).float().expand(2, L))
        ref = vit.forward_features(x)
    assert torch.allclose(latent, ref, atol=1e-5)


def test_initialisation_follows_mae(mae):
    grid = IMG // PATCH
    assert torch.equal(mae.pos_embed[0], torch.from_numpy(sincos_pos_embed_2d(192, grid)))
    assert torch.equal(mae.decoder_pos_embed[0], torch.from_numpy(sincos_pos_embed_2d(DEC, grid)))
    assert torch.count_nonzero(mae.decoder_pred.bias) == 0
    w = mae.blocks[0].mlp.fc1.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    big = MAE("tiny", img_size=64, patch_size=PATCH, decoder_dim=DEC, decoder_depth=1,
              decoder_heads=DEC_HEADS)
    assert 0.015 < big.cls_token.std() < 0.025 and 0.01 < big.mask_token.std() < 0.03


def test_config_rebuilds_the_model(mae):
    cfg = dict(mae.config)
    assert cfg == {"model_size": "tiny", "img_size": IMG, "patch_size": PATCH,
                   "decoder_dim": DEC, "decoder_depth": DEC_DEPTH, "decoder_heads": DEC_HEADS,
                   "norm_pix_loss": True, "mask_ratio": 0.75}
    other = mae_from_config(cfg)
    assert {k: v.shape for k, v in other.state_dict().items()} == \
        {k: v.shape for k, v in mae.state_dict().items()}
    with pytest.raises(ValueError, match="unknown keys \\['depth'\\]"):
        mae_from_config({**cfg, "depth": 3})
    assert infer_config(mae.state_dict(), decoder_heads=DEC_HEADS) == cfg


def test_bad_constructor_arguments_are_named():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MAE("tiny", img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="model_size 'giant'"):
        MAE("giant", img_size=32, patch_size=8)


def test_checkpoint_roundtrip_weights_only(mae, tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, mae, mae.config, epoch=7)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "config", "epoch"} and raw["epoch"] == 7
    ck = load_checkpoint(path)
    rebuilt = mae_from_config(ck["config"])
    rebuilt.load_state_dict(ck["model"], strict=True)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in mae.state_dict().items())
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left nothing behind


def test_reference_checkpoint_with_argparse_namespace_loads(mae, tmp_path):
    path = tmp_path / "mae_ref.pth"
    state = {f"module.{k}": v for k, v in mae.state_dict().items()}  # saved from DDP
    args = argparse.Namespace(input_size=IMG, norm_pix_loss=True, mask_ratio=0.75,
                              output_dir="/home/someone/out")
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 49, "scaler": {},
                "args": args}, path)
    ck = load_checkpoint(path)
    assert ck["epoch"] == 49 and ck["config"] is None
    assert ck["args"]["input_size"] == IMG
    assert set(ck["model"]) == set(mae.state_dict())  # "module." stripped


class Evil:
    """Stands for an arbitrary pickled class that a weights-only loader must refuse."""


def test_checkpoint_with_unknown_classes_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": Evil()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_checkpoint(path)


def test_safetensors_checkpoint_loads(mae, tmp_path):
    import json

    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "mae.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in mae.state_dict().items()},
                                str(path), metadata={"config": json.dumps(mae.config),
                                                     "epoch": "3"})
    ck = load_checkpoint(path)
    assert ck["config"] == mae.config and ck["epoch"] == 3
    assert torch.equal(ck["model"]["blocks.0.attn.qkv.weight"],
                       mae.state_dict()["blocks.0.attn.qkv.weight"])


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
