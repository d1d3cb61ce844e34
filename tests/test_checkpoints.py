"""Checkpoints that are no checkpoint, or cannot serve finetuning, are refused at load time
with the file name and the fix (pipeline/models/mae.py, pretrain.checkpoint import)."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.models import vit
from pipeline.models.mae import MAE, load_checkpoint
from pipeline.params import PretrainParams
from pipeline.pretrain import pretrain

SIZE = "micro"
IMG, PATCH = 32, 8


@pytest.fixture(autouse=True)
def micro_vit(monkeypatch):
    monkeypatch.setitem(vit.VIT_SIZES, SIZE, vit.ViTSize(64, 2, 2, 8))


def cfg(checkpoint, **kw) -> PretrainParams:
    base = dict(checkpoint=str(checkpoint), image_size=IMG, patch_size=PATCH, decoder_dim=32,
                decoder_depth=1, decoder_heads=2)
    base.update(kw)
    return PretrainParams(**base)


def mae_state(img: int = IMG, patch: int = PATCH) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return MAE(SIZE, img_size=img, patch_size=patch, decoder_dim=32, decoder_depth=1,
               decoder_heads=2).state_dict()


# --------------------------------------------------------------------------- not a checkpoint
@pytest.mark.parametrize("name, content, says", [
    ("notes.txt", b"epochs: 40\nlr: 0.001\n",
     r"the file is text \(it starts with 'epochs: 40'\)"),
    ("model.pt", b"<!DOCTYPE html><html>404</html>", r"the file is text"),
    ("empty.pt", b"", r"the file is empty"),
    ("lfs.pth", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
     r"the file is a Git LFS pointer.*git lfs pull"),
])
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: not a checkpoint: {says}.*re-download"):
        load_checkpoint(path)


def test_a_truncated_torch_checkpoint_is_named(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"model": mae_state()}, path)
    path.write_bytes(path.read_bytes()[:5000])  # an interrupted download
    with pytest.raises(ValueError, match=r"cut\.pt: not a readable torch checkpoint .*"
                                         r"truncated.*re-download"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [
    b"abc\x00",  # shorter than the header length
    b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!}xxxxxx",  # a broken JSON header
    b"\xff\x00\x00\x00\x00\x00\x00\x00{}",  # a header longer than the file
], ids=["short", "bad-header", "truncated"])
def test_a_bad_safetensors_file_is_named(tmp_path, content):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"weights\.safetensors: not a readable \.safetensors "
                                         r"file \(.+\); it is truncated or not safetensors: "
                                         r"re-download or re-create it"):
        load_checkpoint(path)


def test_a_git_lfs_pointer_named_safetensors_is_named(tmp_path):
    path = tmp_path / "model.safetensors"  # what a clone without git-lfs holds
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a checkpoint: the file is a "
                                         r"Git LFS pointer"):
        load_checkpoint(path)


def test_misnamed_files_load_or_say_what_they_are(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = {"w": torch.arange(4.0)}
    st = tmp_path / "weights.bin"
    safetensors_torch.save_file(state, str(st), metadata={"config": json.dumps([1])})
    ck = load_checkpoint(st)
    assert torch.equal(ck["model"]["w"], state["w"]) and ck["config"] is None  # not a dict
    pt = tmp_path / "weights.safetensors"
    torch.save({"model": state, "epoch": 2}, pt)
    with pytest.raises(ValueError, match=r"weights\.safetensors: a torch checkpoint \(zip "
                                         r"format\) named \.safetensors; rename it to \.pt"):
        load_checkpoint(pt)


# --------------------------------------------------------------------------- pretrain.checkpoint
def test_text_file_as_pretrain_checkpoint_is_named(tmp_path):
    src = tmp_path / "fmae.pth"
    src.write_text("see https://example.org/fmae for the weights\n")
    with pytest.raises(ValueError, match=r"fmae\.pth: not a checkpoint: the file is text"):
        pretrain(None, tmp_path / "out", cfg(src), model_size=SIZE, seed=0)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize("img, patch", [(64, PATCH), (IMG, 16)])
def test_import_refuses_a_checkpoint_of_another_image_or_patch_size(tmp_path, img, patch):
    src = tmp_path / "other.pth"
    torch.save({"model": mae_state(img, patch), "epoch": 3}, src)  # reference layout, no config
    with pytest.raises(ValueError, match=rf"other\.pth: pretrained on {img} px images with "
                                         rf"{patch} px patches, but pretrain\.image_size is "
                                         rf"{IMG} and pretrain\.patch_size is {PATCH}.*Set "
                                         rf"pretrain\.image_size: {img}, pretrain\.patch_size: "
                                         rf"{patch} and finetune\.image_size: {img}"):
        pretrain(None, tmp_path / "out", cfg(src), model_size=SIZE, seed=0)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    # The same file imports once the params describe it.
    m = pretrain(None, tmp_path / "out", cfg(src, image_size=img, patch_size=patch),
                 model_size=SIZE, seed=0)
    assert m["source_epoch"] == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_import_refuses_non_finite_weights(tmp_path, bad):
    state = mae_state()
    state["blocks.1.mlp.fc2.weight"][3, 5] = bad
    src = tmp_path / "diverged.pth"
    torch.save({"model": state}, src)
    with pytest.raises(ValueError, match=r"diverged\.pth: 1 of \d+ weight tensors hold NaN or "
                                         r"inf \(e\.g\. \['blocks\.1\.mlp\.fc2\.weight'\]\)"):
        pretrain(None, tmp_path / "out", cfg(src), model_size=SIZE, seed=0)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
