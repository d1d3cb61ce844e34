"""FMAE pretraining loop (pipeline/pretrain.py) on a tiny in-memory loader."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import default_collate

from pipeline.models import vit
from pipeline.models.mae import MAE, load_checkpoint, mae_from_config
from pipeline.distributed import DistInfo
from pipeline.params import PretrainParams
from pipeline.pretrain import (MapSample, param_groups, pretrain, resolve_amp,
                               train_mae)

IMG = 32
# A 2-block ViT registered for these tests only: the loop logic does not depend on depth,
# and the shared 2-core machine runs it 6x faster than ViT-tiny.
SIZE = "micro"


@pytest.fixture(autouse=True)
def micro_vit(monkeypatch):
    monkeypatch.setitem(vit.VIT_SIZES, SIZE, vit.ViTSize(64, 2, 2, 8))


def face(i: int, size: int = IMG) -> Image.Image:
    """A crude face: coloured background, skin ellipse, two eyes, a mouth."""
    r = random.Random(i)
    img = Image.new("RGB", (size, size), tuple(r.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    m = size // 8 + r.randrange(size // 8)
    d.ellipse([m, m // 2, size - m, size - m // 2], fill=tuple(r.randrange(120, 256)
                                                              for _ in range(3)))
    for ex in (0.35, 0.65):
        d.ellipse([size * ex - 2, size * 0.4 - 2, size * ex + 2, size * 0.4 + 2], fill=(20,) * 3)
    d.rectangle([size * 0.38, size * 0.7, size * 0.62, size * 0.75], fill=(150, 40, 40))
    return img


IMAGES = [face(i) for i in range(40)]


def memory_factory(images=IMAGES):
    """make_train_loader's interface over a list of PIL images; the order depends only on
    (seed, rank), like the real loader with a fixed num_workers."""
    def factory(*, batch_size, steps_per_epoch, num_workers, map_sample, seed, rank,
                world_size):
        def batches():
            rng = random.Random(seed * 1000 + rank)
            for _ in range(steps_per_epoch):
                yield default_collate([
                    map_sample({"jpg": images[rng.randrange(len(images))], "json": {},
                                "__key__": "k"}) for _ in range(batch_size)])
        return batches()
    return factory


def tiny_cfg(**kw) -> PretrainParams:
    base = dict(image_size=IMG, patch_size=8, decoder_dim=32, decoder_depth=1,
                decoder_heads=2, epochs=3, warmup_epochs=1, steps_per_epoch=3, batch_size=4,
                blr=0.05, num_workers=0, log_every=2)
    base.update(kw)
    return PretrainParams(**base)


# --------------------------------------------------------------------------- pure pieces
def test_weight_decay_groups_follow_the_mae_reference():
    model = MAE(SIZE, img_size=IMG, patch_size=8, decoder_dim=32, decoder_depth=1,
                decoder_heads=2)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"norm.weight", "blocks.0.attn.qkv.bias", "decoder_norm.bias"} <= nd
    # timm 0.3.2's add_weight_decay (the reference): only 1-D tensors and biases skip decay,
    # so the 3-D cls and mask tokens are decayed.
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight",
            "decoder_pred.weight"} <= d
    assert "pos_embed" not in nd | d  # frozen sin-cos: not optimised at all
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])


def test_amp_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_amp("fp16", cpu)


def test_map_sample_resizes_normalises_and_flips():
    img = Image.new("RGB", (48, 48), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 24, 48))  # left half white
    torch.manual_seed(0)
    outs = [MapSample(32, flip=True)({"jpg": img, "json": {}, "__key__": "a"})[0]
            for _ in range(20)]
    assert outs[0].shape == (3, 32, 32)
    left_bright = {bool(o[:, :, :4].mean() > o[:, :, -4:].mean()) for o in outs}
    assert left_bright == {True, False}  # both orientations occur
    plain = MapSample(32, flip=False)({"jpg": img, "json": {}, "__key__": "a"})[0]
    assert plain[0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)
    assert plain[2, 0, -1] == pytest.approx((0 - 0.406) / 0.225, abs=1e-4)
    with pytest.raises(ValueError, match="no decoded 'jpg'"):
        MapSample(32, flip=False)({"__key__": "x", "json": {}})


# --------------------------------------------------------------------------- training
def test_pretrain_writes_outputs_and_loss_falls(tmp_path):
    out = tmp_path / "pretrain"
    cfg = tiny_cfg(epochs=3, steps_per_epoch=4)
    m = pretrain(tmp_path / "unused", out, cfg, model_size=SIZE, seed=0,
                 loader_factory=memory_factory())
    assert m["epochs"] == 3 and m["images_per_s"] > 0
    assert m["final_loss"] < m["first_epoch_loss"]
    assert json.loads((out / "metrics.json").read_text())["final_loss"] == m["final_loss"]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ck) == {"model", "config", "epoch"} and ck["epoch"] == 3
    model = mae_from_config(ck["config"])
    model.load_state_dict(ck["model"], strict=True)
    rows = list(csv.DictReader((out / "loss.csv").open()))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] == 12  # 3 epochs x 4 optimizer steps
    assert {int(r["epoch"]) for r in rows} == {1, 2, 3}
    assert all(float(r["lr"]) >= 0 for r in rows)
    for e in range(1, 4):
        png = out / f"recon_epoch{e}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A finished run leaves the state folder (a DVC output) but no stale resume file.
    assert (out / "state").is_dir() and not (out / "state" / "last.pt").exists()


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = tiny_cfg(accum_iter=2)  # 3 micro-batches per epoch: groups of 2 and 1
    cpu = DistInfo(0, 1, 0, torch.device("cpu"), None)  # bit-exact (CUDA scatter-adds are not)
    full, m_full = train_mae(None, tmp_path / "a", cfg, model_size=SIZE, seed=3,
                             dist_info=cpu, loader_factory=memory_factory())
    _, m_stop = train_mae(None, tmp_path / "b", cfg, model_size=SIZE, seed=3, dist_info=cpu,
                          loader_factory=memory_factory(), stop_after_epoch=1)
    assert m_stop["epochs"] == 1 and (tmp_path / "b" / "state" / "last.pt").is_file()
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    resumed, m_res = train_mae(None, tmp_path / "b", cfg, model_size=SIZE, seed=3,
                               dist_info=cpu, loader_factory=memory_factory())
    assert m_res["epoch_loss"] == m_full["epoch_loss"]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "loss.csv").read_text() == (tmp_path / "b" / "loss.csv").read_text()


def _stale(folder: Path, name: str, size: int = 4096) -> Path:
    """A temporary named as pipeline.io.atomic_path names it, left by a killed run."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}.", dir=folder)
    os.write(fd, b"\0" * size)
    os.close(fd)
    return Path(tmp)


def test_killed_runs_temporaries_are_removed_at_the_start(tmp_path, caplog):
    out, state = tmp_path / "model", tmp_path / "state"  # as dvc.yaml splits them
    stale = [_stale(state, "last.pt", 8192), _stale(out, "checkpoint.pt"),
             _stale(out, "recon_epoch1.png")]
    mine = [state / "notes.txt", state / ".tmp-last.pt", out / "checkpoint.pt.bak"]
    for p in mine:
        p.write_text("not the pipeline's")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        pretrain(None, out, tiny_cfg(epochs=1, warmup_epochs=0, steps_per_epoch=1),
                 model_size=SIZE, seed=0, state_dir=state, loader_factory=memory_factory())
    assert not any(p.exists() for p in stale)
    assert [p.read_text() for p in mine] == ["not the pipeline's"] * 3
    assert "removed stale temporary" in caplog.text and "8.0 KiB freed" in caplog.text
    assert (out / "checkpoint.pt").is_file()


def test_resume_with_changed_settings_is_refused(tmp_path):
    train_mae(None, tmp_path, tiny_cfg(epochs=2), model_size=SIZE, seed=0,
              loader_factory=memory_factory(), stop_after_epoch=1)
    with pytest.raises(ValueError, match=r"blr: 0\.05 -> 0\.1.*Delete .*state"):
        train_mae(None, tmp_path, tiny_cfg(epochs=2, blr=0.1), model_size=SIZE, seed=0,
                  loader_factory=memory_factory())


def test_nan_loss_names_epoch_and_step(tmp_path):
    def bad_factory(*, batch_size, steps_per_epoch, **_):
        def batches():
            for i in range(steps_per_epoch):
                x = torch.zeros(batch_size, 3, IMG, IMG)
                if i == 1:
                    x[0, 0, 0, 0] = float("nan")
                yield (x,)
        return batches()

    with pytest.raises(FloatingPointError, match="epoch 1, step 2 of 3"):
        pretrain(None, tmp_path, tiny_cfg(), model_size=SIZE, seed=0,
                 loader_factory=bad_factory)


def test_short_loader_is_an_error(tmp_path):
    def short(*, steps_per_epoch, batch_size, **_):
        n = steps_per_epoch - 1 if steps_per_epoch > 1 else 1  # the figure batch is fine
        return iter([(torch.zeros(batch_size, 3, IMG, IMG),)] * n)

    with pytest.raises(RuntimeError, match="stopped after 2 of 3 batches"):
        pretrain(None, tmp_path, tiny_cfg(), model_size=SIZE, seed=0, loader_factory=short)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    m = pretrain(None, tmp_path, tiny_cfg(epochs=1, warmup_epochs=0, amp="bf16"),
                 model_size=SIZE, seed=0, loader_factory=memory_factory())
    assert math.isfinite(m["final_loss"])


# --------------------------------------------------------------------------- import
def _reference_checkpoint(path, **model_kw):
    torch.manual_seed(0)
    model = MAE(SIZE, img_size=IMG, patch_size=8, **model_kw)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 49, "scaler": {},
                "args": argparse.Namespace(norm_pix_loss=True, mask_ratio=0.75)}, path)
    return model


def test_released_checkpoint_is_validated_and_converted(tmp_path):
    src = tmp_path / "fmae_micro.pth"
    model = _reference_checkpoint(src, decoder_dim=64, decoder_depth=2, decoder_heads=16)
    out = tmp_path / "pretrain"
    stale = _stale(out, "checkpoint.pt")  # an import killed while writing
    m = pretrain(tmp_path / "no-shards", out, tiny_cfg(checkpoint=str(src)), model_size=SIZE,
                 seed=0)
    assert not stale.exists() and not list(out.glob(".tmp-*"))
    assert m["trained"] is False and m["source_epoch"] == 49 and m["has_decoder"] is True
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["config"]["decoder_dim"] == 64 and ck["config"]["decoder_depth"] == 2
    assert ck["config"]["img_size"] == IMG and ck["args"] is None
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())
    torch.load(out / "checkpoint.pt", weights_only=True)  # no pickled objects inside
    assert (out / "loss.csv").read_text().strip() == "epoch,step,loss,lr"


def test_encoder_only_checkpoint_is_accepted(tmp_path):
    src = tmp_path / "encoder.pth"
    model = MAE(SIZE, img_size=IMG, patch_size=8, decoder_dim=32, decoder_depth=1,
                decoder_heads=2)
    enc = {k: v for k, v in model.state_dict().items()
           if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": enc}, src)
    m = pretrain(None, tmp_path / "out", tiny_cfg(checkpoint=str(src)), model_size=SIZE,
                 seed=0)
    assert m["has_decoder"] is False
    assert set(load_checkpoint(tmp_path / "out" / "checkpoint.pt")["model"]) == set(enc)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    src = tmp_path / "micro.pth"
    _reference_checkpoint(src, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="ViT-micro but model_size is 'tiny'"):
        pretrain(None, tmp_path / "out", tiny_cfg(checkpoint=str(src)), model_size="tiny",
                 seed=0)


@pytest.mark.slow
def test_stage_script_imports_a_checkpoint(tmp_path):
    """`python -m stages.pretrain ...` end to end (params, MLflow, outputs) without training."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "fmae_tiny.pth"
    torch.manual_seed(0)
    model = MAE("tiny", img_size=IMG, patch_size=8, decoder_dim=32, decoder_depth=1,
                decoder_heads=2)
    torch.save({"model": model.state_dict(), "epoch": 5,
                "args": argparse.Namespace(norm_pix_loss=True)}, src)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model_size": "tiny", "pretrain": {
        "checkpoint": str(src), "image_size": IMG, "patch_size": 8, "decoder_dim": 32,
        "decoder_depth": 1, "decoder_heads": 2}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    out = tmp_path / "data" / "pretrain"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.pretrain", "--params", str(params), "--shards",
         str(tmp_path / "no-shards"), "--out", str(out / "model"), "--state",
         str(out / "state"), "--metrics", str(out / "metrics.json"), "--loss-csv",
         str(out / "loss.csv")], cwd=repo, env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = torch.load(out / "model" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 5 and ck["config"]["decoder_dim"] == 32
    assert json.loads((out / "metrics.json").read_text())["trained"] is False
    assert (out / "state").is_dir() and (out / "loss.csv").is_file()
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["params"]["pretrain"]["checkpoint"] == str(src)
    assert not (out / "model" / "run_info.json").exists()


# --------------------------------------------------------------------------- decode: gpu
@pytest.fixture(scope="module")
def face_shards(tmp_path_factory) -> Path:
    """The 40 faces as real JPEG shards (the shards stage), read by the real loader."""
    import io

    from pipeline.params import ShardsParams
    from pipeline.shards import build_shards

    class Item:
        def __init__(self, i):
            self.source, self.key, self.identity, self.i = "syn", f"f{i}", "s", i

    def read(item) -> bytes:
        buf = io.BytesIO()
        IMAGES[item.i].save(buf, "PNG")
        return buf.getvalue()

    out = tmp_path_factory.mktemp("face_shards")
    build_shards([Item(i) for i in range(len(IMAGES))], read, out,
                 ShardsParams(image_size=IMG, samples_per_shard=10, workers=1), progress=False)
    return out


def test_decode_gpu_refused_before_any_work_without_cuda(tmp_path, face_shards):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="pretrain.decode: gpu needs a CUDA device"):
        train_mae(face_shards, out, tiny_cfg(decode="gpu"), model_size=SIZE, seed=0,
                  dist_info=DistInfo(0, 1, 0, torch.device("cpu"), None))
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_decode_param_is_validated():
    from pipeline.params import ParamsError, build

    assert PretrainParams().decode == "cpu"  # the CPU default
    assert build(PretrainParams, {"decode": "gpu"}, "pretrain.").decode == "gpu"
    with pytest.raises(ParamsError, match="pretrain.decode: 'nvjpeg' is not one of cpu, gpu"):
        build(PretrainParams, {"decode": "nvjpeg"}, "pretrain.")


def test_device_decode_path_trains_like_the_cpu_path_and_resumes(tmp_path, face_shards,
                                                                 monkeypatch):
    """decode: gpu hands raw JPEGs to the training process, which decodes them on its device;
    on the CPU device (the CUDA check bypassed) the run is bit-identical to decode: cpu, and
    a stopped and resumed device-path run equals an uninterrupted one."""
    from pipeline import pretrain as pretrain_mod

    cpu = DistInfo(0, 1, 0, torch.device("cpu"), None)
    kw = dict(model_size=SIZE, seed=4, dist_info=cpu)
    cfg = tiny_cfg(epochs=2, steps_per_epoch=3, num_workers=1)
    ref, m_ref = train_mae(face_shards, tmp_path / "cpu", cfg, **kw)
    monkeypatch.setattr(pretrain_mod, "check_device_decode", lambda decode, device: None)
    decoded = []
    real_decode = pretrain_mod.decode_batch
    monkeypatch.setattr(pretrain_mod, "decode_batch",
                        lambda b, d: decoded.append(len(b)) or real_decode(b, d))
    gpu_cfg = tiny_cfg(epochs=2, steps_per_epoch=3, num_workers=1, decode="gpu")
    dev, m_dev = train_mae(face_shards, tmp_path / "dev", gpu_cfg, **kw)
    assert decoded == [4] * 6  # every training batch went through decode_batch
    assert m_dev["epoch_loss"] == m_ref["epoch_loss"]
    a, b = ref.state_dict(), dev.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    train_mae(face_shards, tmp_path / "stop", gpu_cfg, stop_after_epoch=1, **kw)
    resumed, m_res = train_mae(face_shards, tmp_path / "stop", gpu_cfg, **kw)
    assert m_res["epoch_loss"] == m_dev["epoch_loss"]
    c = resumed.state_dict()
    assert all(torch.equal(b[k], c[k]) for k in b)
