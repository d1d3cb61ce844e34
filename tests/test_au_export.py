"""The AU model file (pipeline/au_export.py): round trip without pickle, metadata, refusals."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.au_export import (FORMAT, IMAGENET_MEAN, IMAGENET_STD, describe_eval_transform,
                                eval_transform, load_au_model, read_metadata, save_au_model)
from pipeline.models import vit
from pipeline.models.au_model import AUModel

AUS = [1, 2, 4, 12]
TINY = vit.ViTSize(embed_dim=32, depth=2, num_heads=2, patch_size=8)


@pytest.fixture(autouse=True)
def tiny_vit(monkeypatch):
    monkeypatch.setitem(vit.VIT_SIZES, "tiny", TINY)


def trained_like(n_ids: int = 5) -> AUModel:
    torch.manual_seed(0)
    model = AUModel(vit.build_vit("tiny", 32, 8, global_pool="avg"), len(AUS), n_ids=n_ids,
                    lambda_=1.0)
    with torch.no_grad():  # move every weight away from its initial value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def preprocess():
    from torchvision import transforms as T
    t = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC),
                   T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return describe_eval_transform(t)


def save(path, model, **kw):
    args = dict(aus=AUS, preprocess=preprocess(), dataset="bp4d", fold=2, variant="iat",
                lambda_=2.0, epoch=30, model_size="tiny")
    args.update(kw)
    return save_au_model(path, model, **args)


def test_round_trip_gives_the_same_outputs_without_pickle(tmp_path, monkeypatch):
    model = trained_like()
    path = tmp_path / "model.safetensors"
    save(path, model, val_threshold=0.37)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)["au_logits"]

    def no_pickle(*a, **k):
        raise AssertionError("the model file must load without unpickling")
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded, info = load_au_model(path, "cpu")
    assert not loaded.training and loaded.id_head is None
    with torch.no_grad():
        got = loaded(x)["au_logits"]
    assert torch.equal(got, want)
    assert info["aus"] == AUS and info["image_size"] == 32 and info["patch_size"] == 8
    assert info["thresholds"] == {"fixed": 0.5, "val_selected": 0.37}
    assert info["threshold"] == 0.37
    assert (info["dataset"], info["fold"], info["variant"], info["lambda"], info["epoch"]) == \
        ("bp4d", 2, "iat", 2.0, 30)
    assert info["model"] == {"model_size": "tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
                             "mlp_ratio": 4.0, "img_size": 32, "patch_size": 8,
                             "global_pool": "avg", "qkv_bias": True, "norm_eps": 1e-6}
    assert info["preprocess"] == {"resize": [32, 32], "interpolation": "bicubic",
                                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def test_file_holds_released_key_names_no_id_head_and_json_metadata(tmp_path):
    model = trained_like()
    path = tmp_path / "model.safetensors"
    save(path, model)
    tensors = load_file(str(path))  # plain safetensors, nothing of ours
    assert "head.weight" in tensors and tensors["head.weight"].shape == (len(AUS), 32)
    assert {"fc_norm.weight", "fc_norm.bias", "cls_token", "pos_embed",
            "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"} <= set(tensors)
    assert not [k for k in tensors if "id_head" in k.lower() or k.startswith("encoder.")]
    assert set(tensors) == set(model.encoder.state_dict()) | {"head.weight", "head.bias"}
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert all(isinstance(v, str) for v in raw.values())
    meta = {k: json.loads(v) for k, v in raw.items()}
    assert meta["format"] == FORMAT and meta["aus"] == AUS
    assert meta["thresholds"] == {"fixed": 0.5, "val_selected": None} and meta["threshold"] == 0.5
    assert not list(tmp_path.glob(".tmp-*"))


def test_same_weights_give_the_same_bytes(tmp_path):
    model = trained_like()
    save(tmp_path / "a.safetensors", model)
    save(tmp_path / "b.safetensors", model)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_eval_transform_is_rebuilt_from_the_description():
    from PIL import Image
    from torchvision import transforms as T
    original = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC),
                          T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    im = Image.linear_gradient("L").convert("RGB").resize((50, 40))
    assert torch.equal(eval_transform(describe_eval_transform(original))(im), original(im))
    with pytest.raises(ValueError, match=r"CenterCrop.*au_export"):
        describe_eval_transform(T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor(),
                                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))


def test_other_files_are_refused_with_their_name(tmp_path):
    model = trained_like()
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert read_metadata(plain) is None
    with pytest.raises(ValueError, match=r"plain\.safetensors: not an AU model file"):
        load_au_model(plain)
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_au_model(tmp_path / "gone.safetensors")
    # a file of the format whose tensors do not fit its metadata: keys named
    path = tmp_path / "model.safetensors"
    save(path, model)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["fc_norm.bias"]
    tensors["ID_head.weight"] = torch.zeros(5, 32)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    with pytest.raises(ValueError, match=r"broken\.safetensors: weights do not fit the AU model: "
                                         r"missing keys \['fc_norm\.bias'\]; unexpected keys "
                                         r"\['ID_head\.weight'\]"):
        load_au_model(broken)
    meta["format_version"] = "99"
    newer = tmp_path / "newer.safetensors"
    save_file(load_file(str(path)), str(newer), metadata=meta)
    with pytest.raises(ValueError, match="format version 99"):
        load_au_model(newer)


def test_head_and_au_list_must_agree(tmp_path):
    with pytest.raises(ValueError, match="4 outputs but 3 AUs"):
        save(tmp_path / "m.safetensors", trained_like(), aus=[1, 2, 4])
    assert not (tmp_path / "m.safetensors").exists()
