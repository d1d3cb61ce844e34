"""Facial expression recognition: finetune the pretrained encoder on one FER dataset.

Paper Table 4 / method.md section 5: FMAE finetuned with cross-entropy, top-1 accuracy on the
test split, no IAT (expression datasets have no identity labels). As the authors' FER
branches (``RAFDB_finetune``, ``AffectNet_finetune``) the model is the MAE finetuning ViT:
mean-pooled patch tokens, ``fc_norm`` and one linear head (weights trunc-normal std 2e-5),
plain ``CrossEntropyLoss`` (no label smoothing, no mixup), timm's RandAugment training
transform and a plain square resize for evaluation.

Everything else is the AU finetuning's machinery, imported from :mod:`pipeline.finetune`:
the pretrained-checkpoint checks, layer-wise lr decay parameter groups, AdamW, per-iteration
warmup + half-cycle cosine (``lr = blr * batch / 256``), autocast, the transforms and the
shard interleaving/shuffling. The schedule is per dataset (``finetune_fer.<dataset>``).

Outputs in ``data/finetune_fer/<dataset>/``: ``metrics.json`` (final epoch and best epoch:
top-1, per-class accuracy, macro F1, confusion matrix), ``history.csv``,
``predictions.parquet`` (final epoch, one row per test image), ``confusion_matrix.csv`` and
``confusion_matrix.png`` (final epoch). Only rank 0 writes files or logs to MLflow.
"""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from pipeline.fer_data import read_fer_meta
from pipeline.fer_metrics import fer_report, plot_confusion, write_confusion_csv
from pipeline.finetune import (_load_checkpoint, autocast_dtype, build_transforms,
                               optimizer_step, param_groups_lrd, shard_samples)
from pipeline.io import (atomic_path, atomic_write_csv_rows, atomic_write_json,
                         remove_stale_temporaries, seed_everything)
from pipeline.models.au_model import load_pretrained_encoder
from pipeline.models.vit import build_vit
from pipeline.params import FinetuneFerParams
from pipeline.schedule import lr_at
from pipeline.tracking import is_rank0

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "lr", "loss", "train_top1", "top1", "macro_f1",
                   "mean_class_accuracy")


class FERModel(nn.Module):
    """Pretrained ViT (avg pool + fc_norm) and a linear expression head.

    ``forward(x (B, 3, S, S)) -> logits (B, C)``. Parameter names (``encoder.*``, ``head.*``)
    and :attr:`num_layers` are what :func:`pipeline.finetune.param_groups_lrd` and
    :func:`pipeline.models.au_model.load_pretrained_encoder` expect.
    """

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        if getattr(encoder, "global_pool", "avg") != "avg":
            raise ValueError("FERModel needs an encoder built with global_pool='avg'")
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE finetuning's head init

    @property
    def num_layers(self) -> int:
        return len(self.encoder.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class FerShardStream(IterableDataset):
    """Samples of FER shards: (image (3, S, S), label int64, key).

    Shards are split across loader workers (worker w reads shards w, w+n, ...); training
    interleaves shards and shuffles through a buffer, reseeded per epoch (:meth:`set_epoch`).
    Labels are checked against the number of classes.
    """

    def __init__(self, urls: list[str], n_classes: int, transform, *, shuffle: bool = False,
                 seed: int = 0):
        super().__init__()
        self.urls, self.n_classes, self.transform = list(urls), n_classes, transform
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for sample in shard_samples(self.urls, shuffle=self.shuffle, seed=self.seed,
                                    epoch=self.epoch):
            yield self._decode(sample)

    def _decode(self, sample: dict):
        where = f"{sample.get('__url__')} sample {sample.get('__key__')}"
        try:
            label = int(json.loads(sample["json"])["label"])
            img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise ValueError(f"{where}: unreadable FER sample ({e}); rebuild the shards "
                             "(`dvc repro fer_shards`)") from e
        if not 0 <= label < self.n_classes:
            raise ValueError(f"{where}: label {label} outside 0..{self.n_classes - 1}; "
                             "rebuild the shards (`dvc repro fer_shards`)")
        return self.transform(img), label, sample["__key__"]


def _loader(ds: FerShardStream, batch: int, workers: int, pin: bool, drop_last: bool
            ) -> DataLoader:
    return DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=pin,
                      drop_last=drop_last)


def train_one_epoch(model: FERModel, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                    epoch: int, steps_per_epoch: int, recipe, cfg: FinetuneFerParams,
                    base_lr: float, device: torch.device, amp: torch.dtype | None,
                    scaler) -> dict[str, float]:
    """One pass of cross-entropy training; returns mean loss, training top-1 (%) and lr.

    ``epoch`` is 0-based; the lr follows the per-iteration schedule at fractional epoch
    ``epoch + step / steps_per_epoch`` (warmup ``recipe.warmup_epochs``, total
    ``recipe.epochs``).
    """
    model.train()
    loss_sum, correct, n, lr = 0.0, 0, 0, 0.0
    for step, (x, y, _keys) in enumerate(loader):
        t = epoch + min(step / steps_per_epoch, 1.0)
        lr = lr_at(t, base_lr=base_lr, min_lr=cfg.min_lr, warmup=recipe.warmup_epochs,
                   total=recipe.epochs)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)  # (B, C)
        loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}; "
                                     "lower the dataset's finetune_fer blr or set "
                                     "finetune_fer.amp: off")
        optimizer_step(loss, optimizer, scaler)
        b = x.shape[0]
        n += b
        loss_sum += loss.item() * b
        correct += int((logits.argmax(1) == y).sum())
    if n == 0:
        raise ValueError("the training split yielded no batch; check the FER shards")
    return {"lr": lr, "loss": loss_sum / n, "train_top1": 100.0 * correct / n}


@torch.no_grad()
def predict(model: FERModel, loader: DataLoader, device: torch.device,
            amp: torch.dtype | None) -> dict[str, Any]:
    """Softmax probabilities of every sample, sorted by key.

    Returns:
        ``{"keys": [N], "probs": (N, C) float32, "labels": (N,) int64}``.
    """
    model.eval()
    keys, probs, labels = [], [], []
    for x, y, k in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x.to(device, non_blocking=True))
        probs.append(torch.softmax(logits.float(), 1).cpu())
        labels.append(y)
        keys += list(k)
    if not keys:
        raise ValueError("the test split yielded no samples; check the FER shards")
    order = np.argsort(np.asarray(keys), kind="stable")
    return {"keys": [keys[i] for i in order],
            "probs": torch.cat(probs).numpy().astype(np.float32)[order],
            "labels": torch.cat(labels).numpy().astype(np.int64)[order]}


def predictions_table(pred: dict, classes: list[str], epoch: int):
    """pyarrow table: epoch, key, label, pred, prob_<class> per test image."""
    import pyarrow as pa
    cols: dict[str, Any] = {
        "epoch": pa.array(np.full(len(pred["keys"]), epoch, np.int32)),
        "key": pa.array(pred["keys"], pa.string()),
        "label": pa.array(pred["labels"].astype(np.int32)),
        "pred": pa.array(pred["probs"].argmax(1).astype(np.int32)),
    }
    for j, c in enumerate(classes):
        cols[f"prob_{c}"] = pa.array(pred["probs"][:, j])
    return pa.table(cols)


def _write_history(path: Path, rows: list[dict]) -> None:
    atomic_write_csv_rows(path, rows, HISTORY_COLUMNS)


def _best(epochs: list[dict]) -> dict:
    """The epoch of highest test top-1 (first on ties): the reference's "max accuracy"."""
    return max(epochs, key=lambda r: (r["test"]["top1"] or 0.0, -r["epoch"]))


def build_model(pretrained: Path, cfg: FinetuneFerParams, model_size: str, patch_size: int,
                n_classes: int) -> FERModel:
    """The FER model on the pretrained encoder (checkpoint checked against the settings)."""
    state = _load_checkpoint(pretrained, model_size, patch_size, cfg.image_size)
    encoder = build_vit(model_size, cfg.image_size, patch_size, cfg.drop_path, global_pool="avg")
    encoder.pos_embed.requires_grad_(True)  # trainable in finetuning, as the reference
    model = FERModel(encoder, n_classes)
    try:
        load_pretrained_encoder(model, state)
    except ValueError as e:
        raise ValueError(f"{pretrained}: {e}") from e
    return model


def write_outputs(out_dir: Path, result: dict, final_pred: dict) -> None:
    """predictions.parquet, confusion_matrix.csv/.png and metrics.json of the final epoch."""
    import pyarrow.parquet as pq
    final, classes = result["final"], result["classes"]
    with atomic_path(out_dir / "predictions.parquet") as tmp:
        pq.write_table(predictions_table(final_pred, classes, final["epoch"]), tmp)
    write_confusion_csv(out_dir / "confusion_matrix.csv", final["confusion_matrix"], classes)
    plot_confusion(out_dir / "confusion_matrix.png", final["confusion_matrix"], classes,
                   f"{result['dataset']} test, epoch {final['epoch']}: top-1 "
                   f"{final['top1']:.1f}%")
    atomic_write_json(out_dir / "metrics.json", result)


def finetune_fer(fer_dir: Path, pretrained: Path, out_dir: Path, cfg: FinetuneFerParams, *,
                 dataset: str, model_size: str, patch_size: int, seed: int,
                 tracker=None) -> dict:
    """Finetune the pretrained encoder on ``dataset``'s train split; evaluate every epoch.

    Args:
        fer_dir: ``data/fer_shards/data/<dataset>``.
        pretrained: ``data/pretrain/model/checkpoint.pt`` (any format
            :func:`pipeline.models.mae.load_checkpoint` reads).
        out_dir: ``data/finetune_fer/<dataset>``.
        cfg: the ``finetune_fer`` section; the schedule is ``cfg.recipe(dataset)``.
        model_size, patch_size: the pretrained encoder's size and patch size.
        seed: seeds the head, augmentation and shuffling.
        tracker: a :class:`pipeline.tracking.Tracker`, or None.

    Returns:
        the ``metrics.json`` dict.
    """
    recipe = cfg.recipe(dataset)
    t_train, t_eval = build_transforms(cfg)  # a bad rand_augment fails before any work
    fer_dir, out_dir = Path(fer_dir), Path(out_dir)
    rank0 = is_rank0()
    meta = read_fer_meta(fer_dir, dataset)
    classes = [str(c) for c in meta["classes"]]
    n_train, n_test = meta["splits"]["train"]["count"], meta["splits"]["test"]["count"]
    urls = {s: [str(fer_dir / u) for u in meta["splits"][s]["shards"]] for s in ("train", "test")}
    steps_per_epoch = n_train // recipe.batch_size  # partial last batch dropped
    if steps_per_epoch == 0:
        raise ValueError(f"{fer_dir}: {n_train} training images, fewer than one batch "
                         f"(finetune_fer.{dataset}.batch_size = {recipe.batch_size}); lower it")
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
    seed_everything(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = autocast_dtype(cfg.amp, device)
    pin = device.type == "cuda"
    train_ds = FerShardStream(urls["train"], len(classes), t_train, shuffle=True, seed=seed)
    train_loader = _loader(train_ds, recipe.batch_size, cfg.num_workers, pin, drop_last=True)
    test_loader = _loader(FerShardStream(urls["test"], len(classes), t_eval),
                          recipe.batch_size, cfg.num_workers, pin, drop_last=False)

    model = build_model(pretrained, cfg, model_size, patch_size, len(classes)).to(device)
    base_lr = recipe.blr * recipe.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay),
                                  lr=base_lr)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    log.info("%s: %d train / %d test images, %d classes; lr %.3g (blr %.3g x %d / 256), "
             "%d steps/epoch, %d epochs (warmup %d), device %s", dataset, n_train, n_test,
             len(classes), base_lr, recipe.blr, recipe.batch_size, steps_per_epoch,
             recipe.epochs, recipe.warmup_epochs, device)

    history, epochs, final_pred = [], [], None
    for e in range(recipe.epochs):
        t0 = time.time()
        train_ds.set_epoch(e)
        tr = train_one_epoch(model, train_loader, optimizer, epoch=e,
                             steps_per_epoch=steps_per_epoch, recipe=recipe, cfg=cfg,
                             base_lr=base_lr, device=device, amp=amp, scaler=scaler)
        pred = predict(model, test_loader, device, amp)
        if len(pred["keys"]) != n_test or len(set(pred["keys"])) != n_test:
            raise ValueError(f"test split: read {len(pred['keys'])} samples, meta.json lists "
                             f"{n_test}; rebuild the FER shards")
        rep = fer_report(pred["labels"], pred["probs"].argmax(1), classes)
        epochs.append({"epoch": e + 1, "test": rep})
        history.append({"epoch": e + 1, **tr, "top1": rep["top1"], "macro_f1": rep["macro_f1"],
                        "mean_class_accuracy": rep["mean_class_accuracy"]})
        final_pred = pred
        if rank0:
            _write_history(out_dir / "history.csv", history)
        if tracker is not None:
            tracker.log_metrics({"train/loss": tr["loss"], "train/lr": tr["lr"],
                                 "train/top1": tr["train_top1"], "test/top1": rep["top1"],
                                 "test/macro_f1": rep["macro_f1"]}, step=e + 1)
        log.info("epoch %d/%d %.0fs: lr %.2e loss %.4f train top-1 %.1f | test top-1 %s "
                 "macro F1 %s", e + 1, recipe.epochs, time.time() - t0, tr["lr"], tr["loss"],
                 tr["train_top1"], rep["top1"], rep["macro_f1"])

    final, best = epochs[-1], _best(epochs)
    counts = np.bincount(final_pred["labels"], minlength=len(classes))
    result = {"dataset": dataset, "classes": classes, "n_train": n_train, "n_test": n_test,
              "epochs": recipe.epochs, "model_size": model_size,
              "final": {"epoch": final["epoch"], **final["test"]},
              "best_epoch": {"epoch": best["epoch"], **best["test"]},
              "chance_top1": round(100.0 / len(classes), 4),
              "majority_top1": round(100.0 * counts.max() / counts.sum(), 4)}
    if rank0:
        write_outputs(out_dir, result, final_pred)
    if tracker is not None:
        tracker.log_metrics({"final/top1": final["test"]["top1"],
                             "final/macro_f1": final["test"]["macro_f1"],
                             "best/top1": best["test"]["top1"]})
        for name in ("metrics.json", "history.csv", "confusion_matrix.csv",
                     "confusion_matrix.png"):
            tracker.log_artifact(out_dir / name)
    log.info("%s: final top-1 %.2f%% macro F1 %.2f (epoch %d); best epoch %d top-1 %.2f%%; "
             "chance %.1f%%, majority %.1f%%", dataset, final["test"]["top1"],
             final["test"]["macro_f1"], final["epoch"], best["epoch"], best["test"]["top1"],
             result["chance_top1"], result["majority_top1"])
    return result
