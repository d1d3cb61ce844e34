"""The authors' released weights, built here with their key names and shapes (no download):
finetuned FMAE-IAT AU models through ``predict``, pretrained FMAE encoders as
``pretrain.checkpoint``; pickles are never executed."""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import matplotlib.cbook as cbook
import pandas as pd
import pytest
import torch

from pipeline import predict as P
from pipeline.models import vit
from pipeline.models.au_model import AUModel, load_pretrained_encoder
from pipeline.models.mae import MAE, load_checkpoint
from pipeline.released import BP4D_AUS, au_set, load_released_au_model

HOPPER = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
SIZE, IMG, PATCH = "mini", 64, 16  # the loader reads the size off the shapes: small is fine
D, DEPTH = vit.VIT_SIZES[SIZE].embed_dim, vit.VIT_SIZES[SIZE].depth


def released_finetuned_state(n_aus: int = 12, n_ids: int = 41, seed: int = 0) -> dict:
    """A state dict named as the FMAE-IAT release: timm ViT encoder keys, fc_norm, the AU head
    ``head``, the identity head ``ID_head``."""
    g = torch.Generator().manual_seed(seed)
    state = {"cls_token": torch.randn(1, 1, D, generator=g),
             "pos_embed": torch.randn(1, 1 + (IMG // PATCH) ** 2, D, generator=g),
             "patch_embed.proj.weight": torch.randn(D, 3, PATCH, PATCH, generator=g) * 0.02,
             "patch_embed.proj.bias": torch.zeros(D)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for name, shape in (("norm1.weight", (D,)), ("norm1.bias", (D,)),
                            ("attn.qkv.weight", (3 * D, D)), ("attn.qkv.bias", (3 * D,)),
                            ("attn.proj.weight", (D, D)), ("attn.proj.bias", (D,)),
                            ("norm2.weight", (D,)), ("norm2.bias", (D,)),
                            ("mlp.fc1.weight", (4 * D, D)), ("mlp.fc1.bias", (4 * D,)),
                            ("mlp.fc2.weight", (D, 4 * D)), ("mlp.fc2.bias", (D,))):
            t = torch.randn(*shape, generator=g) * 0.05
            state[b + name] = t + 1 if name.startswith("norm") and name.endswith("weight") else t
    state.update({"fc_norm.weight": torch.ones(D), "fc_norm.bias": torch.zeros(D),
                  "head.weight": torch.randn(n_aus, D, generator=g),
                  "head.bias": torch.randn(n_aus, generator=g),
                  "ID_head.weight": torch.randn(n_ids, D, generator=g),
                  "ID_head.bias": torch.zeros(n_ids)})
    return state


def save_release(path: Path, state: dict, with_args: bool = True) -> Path:
    ck = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 29,
          "scaler": {"scale": 65536.0}}
    if with_args:
        ck["args"] = argparse.Namespace(model="vit_large_patch16", nb_classes=12,
                                        input_size=224, blr=5e-4, output_dir="/authors/out")
    torch.save(ck, path)
    return path


def reference_outputs(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The AU logits the released weights define, computed with a plain timm ViT."""
    enc = vit.build_vit(SIZE, IMG, PATCH, global_pool="avg")
    enc.load_state_dict({k: v for k, v in state.items()
                         if not k.startswith(("head.", "ID_head."))}, strict=True)
    enc.eval()
    with torch.no_grad():
        return enc(x) @ state["head.weight"].T + state["head.bias"]


def test_released_finetuned_checkpoint_loads_without_its_id_head(tmp_path):
    state = released_finetuned_state()
    path = save_release(tmp_path / "authors_fold1.pth", state)
    with pytest.raises(pickle.UnpicklingError):  # plain weights-only loading: the Namespace
        torch.load(path, weights_only=True)
    model, info = load_released_au_model(path)
    assert isinstance(model, AUModel) and model.id_head is None and not model.training
    assert info["aus"] == list(BP4D_AUS) == [1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24]
    assert (info["image_size"], info["patch_size"], info["model"]["model_size"]) == \
        (IMG, PATCH, SIZE)
    assert info["threshold"] == 0.5 and info["args"]["nb_classes"] == 12
    assert info["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        got = model(x)["au_logits"]
    assert torch.allclose(got, reference_outputs(state, x), atol=1e-5)
    # DDP-saved keys ("module.") and a checkpoint without args load too
    ddp = save_release(tmp_path / "ddp.pth", {f"module.{k}": v for k, v in state.items()},
                       with_args=False)
    with torch.no_grad():
        assert torch.equal(load_released_au_model(ddp)[0](x)["au_logits"], got)


def test_key_problems_are_named(tmp_path):
    state = released_finetuned_state()
    del state["blocks.3.norm2.bias"]
    state["blocks.0.attn.rel_pos"] = torch.zeros(3)
    path = save_release(tmp_path / "odd.pth", state)
    with pytest.raises(ValueError, match=r"odd\.pth: weights do not fit the AU model: missing "
                                         r"keys \['blocks\.3\.norm2\.bias'\]; unexpected keys "
                                         r"\['blocks\.0\.attn\.rel_pos'\]"):
        load_released_au_model(path)
    state = released_finetuned_state()
    state["fc_norm.weight"] = torch.ones(D + 1)
    with pytest.raises(ValueError, match=r"wrong shapes \['fc_norm\.weight \(129,\) \(model "
                                         r"\(128,\)\)'\]"):
        load_released_au_model(save_release(tmp_path / "shape.pth", state))
    state = released_finetuned_state()
    state["blocks.6.norm1.weight"] = torch.ones(D)  # 7 blocks: no known ViT size
    with pytest.raises(ValueError, match=r"128 wide and 7 blocks deep matches no known size"):
        load_released_au_model(save_release(tmp_path / "deep.pth", state))


def test_au_set_of_other_heads_must_be_named(tmp_path):
    path = save_release(tmp_path / "disfa.pth", released_finetuned_state(n_aus=8, n_ids=27))
    with pytest.raises(ValueError, match=r"the AU head has 8 outputs; say which AUs"):
        load_released_au_model(path)
    _, info = load_released_au_model(path, aus="disfa")
    assert info["aus"] == [1, 2, 4, 6, 9, 12, 25, 26]
    with pytest.raises(ValueError, match=r"8 outputs but --aus names 12 AUs"):
        load_released_au_model(path, aus="bp4d")
    assert au_set("1, 2,4") == [1, 2, 4] and au_set("BP4D+") == list(BP4D_AUS)
    with pytest.raises(ValueError, match="dataset name"):
        au_set("fer2013")


class _Payload:
    """Unpickling this would create a file: a weights-only loader must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_arbitrary_pickles_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": released_finetuned_state(), "args": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match=r"evil\.pth: refusing to unpickle"):
        load_released_au_model(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pth"  # an old-style (non-zip) pickle
    with open(raw, "wb") as f:
        pickle.dump({"model": {}, "x": _Payload(str(marker))}, f, protocol=2)
    with pytest.raises(ValueError):
        load_released_au_model(raw)
    assert not marker.exists()


def test_predict_runs_a_released_checkpoint(tmp_path):
    path = save_release(tmp_path / "authors_fold1.pth", released_finetuned_state())
    out = tmp_path / "aus.csv"
    assert P.main(["predict", str(HOPPER), "--model", str(path), "--out", str(out),
                   "--quiet"]) == 0
    df = pd.read_csv(out)
    names = ["AU01", "AU02", "AU04", "AU06", "AU07", "AU10", "AU12", "AU14", "AU15", "AU17",
             "AU23", "AU24"]
    assert list(df.columns) == ["frame", "face_id", "timestamp", "confidence", "success",
                                "input"] + names + [f"{n}_c" for n in names]
    assert df["success"].tolist() == [1] and df[names].iloc[0].between(0, 1).all()
    assert P.main(["predict", str(HOPPER), "--model", str(path), "--out", str(out), "--aus",
                   "bp4d", "--quiet"]) == 0


def reference_mae_state(seed: int = 0) -> dict:
    """An FMAE pretraining state dict with the MAE reference's names (encoder + decoder)."""
    torch.manual_seed(seed)
    state = MAE(SIZE, IMG, PATCH, decoder_dim=64, decoder_depth=2, decoder_heads=4).state_dict()
    assert {"mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_norm.weight",
            "decoder_pred.weight", "decoder_blocks.1.attn.qkv.weight", "norm.weight",
            "blocks.5.mlp.fc2.bias", "patch_embed.proj.weight", "cls_token"} <= set(state)
    return state


def test_released_pretrained_encoder_imports_as_pretrain_checkpoint(tmp_path):
    from pipeline.params import PretrainParams, build
    from pipeline.pretrain import import_checkpoint

    state = reference_mae_state()
    src = tmp_path / "FMAE_ViT_mini_pretrain.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 49, "scaler": {},
                "args": argparse.Namespace(norm_pix_loss=True, mask_ratio=0.75)}, src)
    cfg = build(PretrainParams, {"checkpoint": str(src), "image_size": IMG, "patch_size": PATCH,
                                 "decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 4},
                "pretrain.")
    import_checkpoint(src, tmp_path / "pretrain", cfg, model_size=SIZE)
    written = load_checkpoint(tmp_path / "pretrain" / "checkpoint.pt")
    assert written["epoch"] == 49 and written["config"]["model_size"] == SIZE
    model = AUModel(vit.build_vit(SIZE, IMG, PATCH, global_pool="avg"), n_aus=12)
    missing, unexpected = load_pretrained_encoder(model, written["model"])
    assert unexpected == ["norm.bias", "norm.weight"]
    assert torch.equal(model.encoder.state_dict()["blocks.2.attn.qkv.weight"],
                       state["blocks.2.attn.qkv.weight"])
    # ... and predict says what to do with it instead of failing on keys
    with pytest.raises(ValueError, match=r"no AU head .* set it as pretrain\.checkpoint"):
        load_released_au_model(src)
